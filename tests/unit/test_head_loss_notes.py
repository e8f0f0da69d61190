"""The head keeps why each lost node was lost, to explain missing layers until a node
covers them again. A replica's loss leaves nothing missing, so no join clears its note,
and a swarm's churn mints node ids: the notes kept are bounded, the oldest going first."""

from __future__ import annotations

from molink.config import LayerRange
from molink.pipeline.head_membership import MAX_LOSS_NOTES
from molink.pipeline.identity import NodeInfo
from tests.helpers.toy_swarm import MODEL, toy_swarm


def test_loss_notes_are_bounded_oldest_first() -> None:
    with toy_swarm((("a", 1, 2), ("n", 2, 4))) as swarm:
        members = swarm.head._members
        for i in range(MAX_LOSS_NOTES + 5):
            replica = NodeInfo(f"r{i}", MODEL, LayerRange(1, 2), f"127.0.0.1:{i + 1}")
            members._registry.join(replica)
            members.stage_down(replica, "gone")
        kept = list(members._lost)
        assert len(kept) == MAX_LOSS_NOTES
        assert kept[0] == "r5" and kept[-1] == f"r{MAX_LOSS_NOTES + 4}"
