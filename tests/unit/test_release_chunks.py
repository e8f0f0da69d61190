"""A head may be configured with a larger ``max_sequences_per_head`` than a stage of its
route; a stage refuses a release naming more sequences than its own bound, and then
frees none of them. The head sends long releases in chunks of at most
``RELEASE_CHUNK_SEQUENCES``, which a stage of the default bound or any bound at least
that large accepts, so each sequence is freed."""

from __future__ import annotations

import dataclasses

from molink.transport.validate import RELEASE_CHUNK_SEQUENCES
from tests.helpers.polling import first_result, wait_until
from tests.helpers.toy_swarm import prefill, toy_swarm


def test_a_release_longer_than_a_stages_bound_frees_every_sequence_there() -> None:
    count = RELEASE_CHUNK_SEQUENCES + 6
    with toy_swarm((("n", 1, 4),)) as swarm:
        head, stage, held = swarm.head, swarm.nodes["n"], swarm.executors["n"]
        # The stage checks releases against its own bound, smaller than the head's.
        stage.config = dataclasses.replace(
            stage.config, max_sequences_per_head=RELEASE_CHUNK_SEQUENCES
        )
        assert head.config.max_sequences_per_head > count
        for seq_id in range(count):
            head.submit(prefill(seq_id, seq_id))
            assert first_result(head).error is None
        assert len([key for key in held.sequences if key[0] == "h"]) == count
        head.release(list(range(count)))
        assert wait_until(lambda: not any(key[0] == "h" for key in held.sequences), timeout=10.0)


def test_a_direct_release_longer_than_a_stages_bound_frees_every_sequence_there() -> None:
    count = RELEASE_CHUNK_SEQUENCES + 6
    with toy_swarm((("n", 1, 4),)) as swarm:
        head, stage, held = swarm.head, swarm.nodes["n"], swarm.executors["n"]
        stage.config = dataclasses.replace(
            stage.config, max_sequences_per_head=RELEASE_CHUNK_SEQUENCES
        )
        for seq_id in range(count):
            head.submit(prefill(seq_id, seq_id))
            assert first_result(head).error is None
        client = head._monitor._client(stage.info)
        assert client.release("h", list(range(count)), timeout=10.0) == count
        assert wait_until(lambda: not any(key[0] == "h" for key in held.sequences), timeout=10.0)
