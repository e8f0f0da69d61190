"""The head's routes: new sequences spread by the rule, a sequence keeps its route."""

from __future__ import annotations

from molink.pipeline.route_book import RouteBook, SwarmSnapshot
from molink.placement.router import Candidate
from molink.sampling_params import SamplingParams
from molink.step import NewSequenceData, ScheduledSequence, StepPlan


def _snapshot(*replicas: Candidate) -> SwarmSnapshot:
    return SwarmSnapshot(
        head=Candidate("head", "h:1", 0, 2),
        nodes=replicas,
        num_layers=4,
        head_address="h:1",
        step_bytes=0.0,
        links=lambda a, b: None,
        block_size=4,
    )


def _plan(step_id: int, *seq_ids: int) -> StepPlan:
    return StepPlan(
        step_id,
        tuple(ScheduledSequence(s, 0, 3, (), True) for s in seq_ids),
        (1, 2, 3) * len(seq_ids),
        tuple(NewSequenceData(s, (1, 2, 3), 3, SamplingParams()) for s in seq_ids),
    )


def test_equal_replicas_share_new_sequences_and_sequences_stay() -> None:
    book = RouteBook(lambda: _snapshot(Candidate("a", "a:1", 2, 4), Candidate("b", "b:1", 2, 4)))
    routes = []
    for seq_id in range(4):
        choices = book.choices()
        takers = [c for c in choices if c.accepts(seq_id, 3)]
        assert len(takers) == 1
        book.bind(_plan(seq_id, seq_id), takers[0])
        routes.append(book.route_of(seq_id).key)
    assert sorted(routes) == ["head->a", "head->a", "head->b", "head->b"]
    # A sequence is only accepted on its own route.
    for choice in book.choices():
        assert choice.accepts(0, 4) == (choice.route.key == routes[0])
    groups = book.forget([0, 1])
    assert sorted(key for key in groups) == sorted(set(routes[:2]))
    assert book.route_of(0) is None


def test_a_full_node_gets_no_new_sequence_for_a_while() -> None:
    book = RouteBook(
        lambda: _snapshot(
            Candidate("a", "a:1", 2, 4, room_blocks=100),
            Candidate("b", "b:1", 2, 4, rtt_s=0.5, room_blocks=100),
        )
    )
    assert book.route_for_new(3).key == "head->a"
    book.mark_full("a")
    assert book.route_for_new(3).key == "head->b"


def test_a_new_sequence_goes_to_the_replica_with_room_when_the_cheaper_one_is_full() -> None:
    """The route offered to new sequences must be one that can hold them: offering the
    full replica made every choice refuse them until its cooldown ran out."""
    book = RouteBook(
        lambda: _snapshot(
            Candidate("a", "a:1", 2, 4, room_blocks=100),
            Candidate("b", "b:1", 2, 4, rtt_s=0.5, room_blocks=100),
        )
    )
    book.mark_full("a")
    choices = book.choices()
    assert [c.route.key for c in choices if c.takes_new] == ["head->b"]
    assert [c.route.key for c in choices if c.accepts(1, 3)] == ["head->b"]
    assert book.new_route().key == "head->b"


def test_with_every_replica_full_new_sequences_are_still_offered_a_route() -> None:
    """Nothing can free room on a swarm that runs nothing: the rule's route is offered
    anyway, and a sequence starts there when no other runs (its nodes refuse what does
    not fit)."""
    book = RouteBook(
        lambda: _snapshot(
            Candidate("a", "a:1", 2, 4, room_blocks=0),
            Candidate("b", "b:1", 2, 4, rtt_s=0.5, room_blocks=0),
        )
    )
    (choice,) = book.choices()
    assert choice.takes_new and choice.route.key == "head->a"
    assert choice.accepts(1, 3)


def test_plans_outside_the_engine_take_the_best_route() -> None:
    book = RouteBook(lambda: _snapshot(Candidate("a", "a:1", 2, 4)))
    route = book.route_for_plan(_plan(1, 7))
    assert route is not None and book.route_of(7) == route
    assert book.load() == {"head": 1, "a": 1}
    groups = book.evict("a")
    assert {key: ids for key, (_, ids) in groups.items()} == {route.key: [7]}
    assert book.route_of(7) is None and book.evict("a") == {}


def test_an_avoided_node_gets_no_new_sequences() -> None:
    book = RouteBook(
        lambda: _snapshot(Candidate("a", "a:1", 2, 4), Candidate("b", "b:1", 2, 4, step_s=0.5))
    )
    assert book.route_for_new(3).key == "head->a"
    book.avoid("a", 60.0)
    assert book.route_for_new(3).key == "head->b"
    assert [c.route.key for c in book.choices()] == ["head->b"]


def _admit_burst(book: RouteBook, num: int) -> dict[str, int]:
    """``num`` new sequences arrive at once: plans are scheduled as the engine does (each
    route's choice admits waiting sequences in order until it refuses one) until every
    sequence has a route; how many each route took."""
    waiting = list(range(num))
    step = 0
    while waiting:
        progressed = False
        for choice in book.choices():
            admitted = []
            while waiting and choice.accepts(waiting[0], 3):
                admitted.append(waiting.pop(0))
            if admitted:
                book.bind(_plan(step, *admitted), choice)
                step += 1
                progressed = True
        assert progressed, "no route took the waiting sequences"
    counts: dict[str, int] = {}
    for seq_id in range(num):
        key = book.route_of(seq_id).key
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_a_burst_of_new_sequences_spreads_over_replicas_measured_a_little_apart() -> None:
    """Step times 10% apart (noise on a loaded machine) and per-token costs far below a
    step: the sequences admitted a moment ago count as load, so the burst is shared."""
    book = RouteBook(
        lambda: _snapshot(
            Candidate("a", "a:1", 2, 4, step_s=0.10, per_seq_s=0.0005),
            Candidate("b", "b:1", 2, 4, step_s=0.11, per_seq_s=0.0005),
        )
    )
    counts = _admit_burst(book, 8)
    assert counts["head->a"] >= 4 and counts["head->b"] >= 3, counts


def test_a_much_faster_replica_still_takes_more_of_a_burst() -> None:
    book = RouteBook(
        lambda: _snapshot(
            Candidate("a", "a:1", 2, 4, step_s=0.05, per_seq_s=0.0005),
            Candidate("b", "b:1", 2, 4, step_s=0.15, per_seq_s=0.0005),
        )
    )
    counts = _admit_burst(book, 16)
    assert counts["head->a"] > 2 * counts.get("head->b", 0), counts


def test_a_burst_spreads_onto_a_restarted_replica_with_no_timings() -> None:
    book = RouteBook(
        lambda: _snapshot(
            Candidate("a", "a:1", 2, 4, step_s=0.10, per_seq_s=0.0005),
            Candidate("b", "b:1", 2, 4),  # restarted: nothing measured yet
        )
    )
    counts = _admit_burst(book, 8)
    assert counts["head->a"] >= 3 and counts["head->b"] >= 3, counts


def test_a_burst_spreads_onto_a_replica_that_just_joined() -> None:
    """Measured compute and round trip on one replica, nothing yet on the other."""
    book = RouteBook(
        lambda: _snapshot(
            Candidate("a", "a:1", 2, 4, step_s=0.10, per_seq_s=0.01, rtt_s=0.04),
            Candidate("b", "b:1", 2, 4),
        )
    )
    counts = _admit_burst(book, 32)
    assert counts["head->a"] >= 12 and counts["head->b"] >= 12, counts


def test_a_burst_at_start_weighs_load_by_the_steps_the_nodes_announced() -> None:
    """Nothing measured yet and round trips 20 ms apart: with the priors' 10 ms step the
    nearer replica would take most of the burst; the 0.1 s steps the replicas announced
    make each sequence they hold weigh enough to share it."""
    book = RouteBook(
        lambda: _snapshot(
            Candidate("a", "a:1", 2, 4, rtt_s=0.003, announced_step_s=0.1),
            Candidate("b", "b:1", 2, 4, rtt_s=0.023, announced_step_s=0.1),
        )
    )
    counts = _admit_burst(book, 8)
    assert counts["head->a"] >= 4 and counts["head->b"] >= 3, counts


def test_new_sequences_get_their_route_while_another_route_always_has_decodes() -> None:
    """Sequences run on a, whose decodes fill every plan; the rule now sends new ones to
    b. The engine takes the first route choice that yields a plan, so b must come first
    now and then, or the waiting sequences would wait until a's had finished."""
    book = RouteBook(lambda: _snapshot(Candidate("a", "a:1", 2, 4), Candidate("b", "b:1", 2, 4)))
    book.route_for_plan(_plan(0, 0, 1, 2))  # three sequences on the best route
    (loaded,) = {book.route_of(s).key for s in (0, 1, 2)}
    waiting = 3
    for fill in range(2):
        for choice in book.choices():
            if choice.route.key == loaded:  # its decodes make a plan: the slot is taken
                break
            if choice.accepts(waiting, 3):
                book.bind(_plan(fill + 1, waiting), choice)
                break
        if book.route_of(waiting) is not None:
            break
    assert book.route_of(waiting) is not None, "the new sequence never got a plan"
    assert book.route_of(waiting).key != loaded


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_route_for_new_sequences_is_worked_out_once_per_step() -> None:
    """Telemetry's lookup (``new_route``) reuses what the step's ``choices`` worked out; a
    node found full or avoided, a cooldown running out, or age make it work it out again.
    Each working out reads the swarm once, so the reads count them."""
    reads = []
    candidates = (Candidate("a", "a:1", 2, 4), Candidate("b", "b:1", 2, 4, step_s=0.5))

    def snapshot() -> SwarmSnapshot:
        reads.append(1)
        return _snapshot(*candidates)

    clock = _Clock()
    book = RouteBook(snapshot, clock=clock)
    (choice,) = book.choices()
    assert len(reads) == 1 and choice.route.key == "head->a"
    assert [book.new_route().key for _ in range(3)] == ["head->a"] * 3
    assert len(reads) == 1  # the step's answer, not worked out again
    book.bind(_plan(1, 7), choice)  # sequences bound during the step do not renew it
    assert book.new_route().key == "head->a" and len(reads) == 1
    book.forget([7])
    assert book.new_route().key == "head->a" and len(reads) == 1
    book.choices()  # the next step works it out afresh
    assert len(reads) == 2

    book.avoid("a", 0.1)
    assert book.new_route().key == "head->b" and len(reads) == 3
    assert book.new_route().key == "head->b" and len(reads) == 3
    clock.now += 0.1  # the cooldown ran out before the answer's age did
    assert book.new_route().key == "head->a" and len(reads) == 4
    book.mark_full("a")
    assert book.new_route().key == "head->b" and len(reads) == 5
    clock.now += 1.0  # past FULL_COOLDOWN_S and NEW_ROUTE_MAX_AGE_S
    assert book.new_route().key == "head->a" and len(reads) == 6
    clock.now += 0.1
    assert book.new_route().key == "head->a" and len(reads) == 6
    clock.now += 0.2  # older than NEW_ROUTE_MAX_AGE_S: the swarm's measurements moved on
    assert book.new_route().key == "head->a" and len(reads) == 7
    book.evict("b")
    assert book.new_route().key == "head->a" and len(reads) == 8


def test_cooldowns_that_ran_out_are_dropped() -> None:
    # A swarm's churn mints node ids: a cooldown kept after it ran out would stay for good.
    now = [0.0]
    book = RouteBook(
        lambda: _snapshot(Candidate("a", "a:1", 2, 4, room_blocks=100)), lambda: now[0]
    )
    for i in range(100):
        book.mark_full(f"gone{i}")
        book.avoid(f"left{i}", 5.0)
    book.mark_full("a")
    assert book.route_for_new(3) is None  # a, the only node, is full
    now[0] += 3600.0
    assert book.route_for_new(3).key == "head->a"
    assert book._full_until == {} and book._avoid_until == {}
