"""A head may be configured with a larger ``max_sequences_per_head`` than a stage of its
route; a stage refuses a release naming more sequences than its own bound, and then
frees none of them. The head sends long releases in chunks of at most
``RELEASE_CHUNK_SEQUENCES``, which a stage of the default bound or any bound at least
that large accepts, so each sequence is freed."""

from __future__ import annotations

import dataclasses

import pytest

from molink.errors import ProtocolError
from molink.transport.validate import RELEASE_CHUNK_SEQUENCES, check_release_size
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
        assert client is not None
        assert client.release("h", list(range(count)), timeout=10.0) == count
        assert wait_until(lambda: not any(key[0] == "h" for key in held.sequences), timeout=10.0)


SMALL_BOUND = 8  # a stage configured below RELEASE_CHUNK_SEQUENCES
HELD = 20  # more than SMALL_BOUND, fewer than a chunk: one release of them all


def test_a_stage_bound_below_a_chunk_still_frees_a_whole_chunk_sent_in_band() -> None:
    with toy_swarm((("n", 1, 4),)) as swarm:
        head, stage, held = swarm.head, swarm.nodes["n"], swarm.executors["n"]
        for seq_id in range(HELD):
            head.submit(prefill(seq_id, seq_id))
            assert first_result(head).error is None
        stage.config = dataclasses.replace(stage.config, max_sequences_per_head=SMALL_BOUND)
        head.release(list(range(HELD)))
        assert wait_until(lambda: not any(key[0] == "h" for key in held.sequences), timeout=10.0)


def test_a_stage_bound_below_a_chunk_still_frees_a_whole_chunk_released_directly() -> None:
    with toy_swarm((("n", 1, 4),)) as swarm:
        head, stage, held = swarm.head, swarm.nodes["n"], swarm.executors["n"]
        for seq_id in range(HELD):
            head.submit(prefill(seq_id, seq_id))
            assert first_result(head).error is None
        stage.config = dataclasses.replace(stage.config, max_sequences_per_head=SMALL_BOUND)
        client = head._monitor._client(stage.info)
        assert client is not None
        assert client.release("h", list(range(HELD)), timeout=10.0) == HELD
        assert wait_until(lambda: not any(key[0] == "h" for key in held.sequences), timeout=10.0)


def test_a_release_beyond_both_the_bound_and_a_chunk_is_refused_naming_the_field() -> None:
    check_release_size(RELEASE_CHUNK_SEQUENCES, SMALL_BOUND, "release of head h")
    with pytest.raises(ProtocolError, match=r"65 sequences.*64 \(max_sequences_per_head"):
        check_release_size(RELEASE_CHUNK_SEQUENCES + 1, SMALL_BOUND, "release of head h")
