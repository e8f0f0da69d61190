"""What the head keeps of a stage's health answer. The head reads a stage's latest
answer every time it routes a new sequence (its own KV usage there, the stage's links),
so a stage that fills its answer with usage of other heads, links to nodes this head
does not know or an endless status message would make the head keep it all and walk it
on every route choice: only what this head uses is kept, and the message is bounded and
printable (it is logged and shown)."""

from __future__ import annotations

from molink.pipeline.health import MAX_ANSWER_BYTES, MAX_HEALTH_MESSAGE_CHARS
from molink.transport.generated import molink_pb2 as pb
from tests.helpers.toy_swarm import toy_swarm

MANY = 2000


def _stuffed(
    head_id: str, node_id: str, next_id: str, honest: pb.HealthResponse
) -> pb.HealthResponse:
    answer = pb.HealthResponse()
    answer.CopyFrom(honest)
    answer.status = pb.HEALTH_STATUS_DEGRADED
    answer.message = "\x1b[2J" + "x" * 100_000
    answer.total_kv_blocks = 100
    answer.free_kv_blocks = 40
    answer.heads.extend(pb.HeadUsage(head_id=f"other-{i}", kv_blocks=1) for i in range(MANY))
    answer.heads.extend(pb.HeadUsage(head_id=head_id, kv_blocks=7) for _ in range(3))
    answer.links.extend(
        pb.LinkReport(from_node_id=node_id, to_node_id=f"nobody-{i}", rtt_s=0.001)
        for i in range(MANY)
    )
    answer.links.extend(
        pb.LinkReport(head_id="someone", from_node_id=node_id, to_node_id=next_id, rtt_s=9.0)
        for _ in range(MANY)
    )
    answer.links.append(pb.LinkReport(from_node_id=node_id, to_node_id=next_id, rtt_s=0.002))
    answer.throughput_tokens_per_s = float("nan")
    answer.uptime_s = -5.0
    return answer


def test_the_head_keeps_only_its_own_part_of_a_stuffed_health_answer() -> None:
    with toy_swarm((("a", 1, 2), ("n", 2, 4))) as swarm:
        head, stage = swarm.head, swarm.nodes["a"]
        honest = stage.health()
        stuffed = _stuffed(head.head_id, "a", "n", honest)
        stage.health = lambda: stuffed  # what the servicer answers with
        head._monitor.check_once()
        kept = head._monitor.latest()["a"]
        assert isinstance(kept, pb.HealthResponse)
        assert [(u.head_id, u.kv_blocks) for u in kept.heads] == [(head.head_id, 7)]
        assert [(r.to_node_id, r.rtt_s) for r in kept.links] == [("n", 0.002)]
        assert len(kept.message) <= MAX_HEALTH_MESSAGE_CHARS and kept.message.isprintable()
        assert (kept.total_kv_blocks, kept.free_kv_blocks) == (100, 40)
        # No measurement: unknown, as a node that has computed nothing yet.
        assert (kept.throughput_tokens_per_s, kept.uptime_s) == (0.0, 0.0)
        assert kept.ByteSize() < 4096


def test_a_health_answer_over_the_bound_fails_the_check_unread() -> None:
    with toy_swarm((("a", 1, 2), ("n", 2, 4))) as swarm:
        head, stage = swarm.head, swarm.nodes["a"]
        huge = pb.HealthResponse(message="x" * (MAX_ANSWER_BYTES + 1))
        stage.health = lambda: huge
        failure = head._monitor.probe(stage.info)
        assert failure is not None and "RESOURCE_EXHAUSTED" in failure
        del stage.health  # the stage's own answer again
        assert head._monitor.probe(stage.info) is None
