"""A stage remembers when each head's lease lapsed, so that a step received before the
lapse is dropped as stale. Any member can mint head ids (each renews a lease by checking
the node's health under its own id, then falls silent): those records are bounded, the
oldest forgotten first, and the latest lapses are still answered."""

from __future__ import annotations

from molink.pipeline.leases import MAX_LAPSE_RECORDS, LeaseTable


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lapse_records_of_minted_heads_are_bounded_and_the_latest_kept() -> None:
    clock = _Clock()
    leases = LeaseTable(10.0, clock)
    for index in range(MAX_LAPSE_RECORDS + 50):
        leases.renew(f"minted-{index}")
    clock.now += 11
    assert len(leases.lapsed()) == MAX_LAPSE_RECORDS + 50  # each is still freed
    leases.renew("honest")
    clock.now += 11
    assert leases.lapsed() == ["honest"]
    assert len(leases._lapsed_at) == MAX_LAPSE_RECORDS
    # A step of the honest head received before its lapse is still found stale.
    assert leases.lapsed_since("honest", clock.now - 1)
    assert not leases.lapsed_since("honest", clock.now + 1)
