"""The data model: SequenceData's running token list, fork() independence, statuses, Request."""

from __future__ import annotations

import pytest

from m0_config.outputs import CompletionOutput, Logprob, RequestOutput
from m0_config.sampling_params import SamplingParams
from m0_config.sequence import Request, Sequence, SequenceData, SequenceStatus

pytestmark = pytest.mark.m0

S = SequenceStatus
FINISHED = [S.FINISHED_STOPPED, S.FINISHED_LENGTH_CAPPED, S.FINISHED_ABORTED, S.FINISHED_IGNORED]
UNFINISHED = [S.WAITING, S.RUNNING, S.SWAPPED]


# ---------------------------------------------------------------------------------------------
# SequenceData
# ---------------------------------------------------------------------------------------------


def test_sequence_data_lengths_and_ids():
    d = SequenceData([1, 2, 3])
    assert d.prompt_token_ids == (1, 2, 3) and d.output_token_ids == []
    d.append_token_id(7, logprob=-0.5)
    d.append_token_id(8, logprob=-0.25)
    assert d.get_token_ids() == [1, 2, 3, 7, 8]
    assert (d.get_len(), d.get_prompt_len(), d.get_output_len()) == (5, 3, 2)
    assert d.get_last_token_id() == 8
    assert d.output_token_ids == [7, 8]
    assert d.cumulative_logprob == pytest.approx(-0.75)


def test_get_token_ids_is_one_list_kept_current():
    d = SequenceData(range(100))
    ids = d.get_token_ids()
    assert d.get_token_ids() is ids  # no list is built per call
    for t in range(50):
        d.append_token_id(1000 + t)
        assert d.get_token_ids() is ids  # appending does not replace it either ...
        assert ids[-1] == 1000 + t  # ... it extends it in place
    assert ids == list(range(100)) + [1000 + t for t in range(50)]


def test_prompt_cannot_be_changed_through_the_data():
    prompt = [1, 2, 3]
    d = SequenceData(prompt)
    prompt.append(4)  # the caller's list is not aliased
    assert d.prompt_token_ids == (1, 2, 3) and d.get_len() == 3
    assert isinstance(d.prompt_token_ids, tuple)


def test_sequence_data_with_an_output_prefix():
    d = SequenceData([1, 2], output_token_ids=[3], cumulative_logprob=-1.0)
    assert d.get_token_ids() == [1, 2, 3] and d.get_output_len() == 1 and d.cumulative_logprob == -1.0


def test_sequence_data_copy_is_deep():
    d = SequenceData([1, 2], [3])
    d.num_computed_tokens = 2
    c = d.copy()
    assert c.get_token_ids() == d.get_token_ids() and c.num_computed_tokens == 2
    c.append_token_id(9, -1.0)
    assert d.get_token_ids() == [1, 2, 3] and d.output_token_ids == [3] and d.cumulative_logprob == 0.0
    d.append_token_id(5)
    assert c.get_token_ids() == [1, 2, 3, 9]


# ---------------------------------------------------------------------------------------------
# Sequence and fork()
# ---------------------------------------------------------------------------------------------


def make_seq(seq_id: int = 0) -> Sequence:
    """A running sequence with every piece of per-sequence state filled in."""
    seq = Sequence(seq_id, "hello", [11, 12, 13])
    seq.status = S.RUNNING
    seq.append_token_id(21, -0.1, {21: Logprob(-0.1, rank=1)})
    seq.append_token_id(22, -0.2, {22: Logprob(-0.2, rank=1), 23: Logprob(-2.0, rank=2)})
    seq.block_table = [4, 9]
    seq.output_text = "ab"
    seq.tokens = ["a", "b"]
    seq.prefix_offset, seq.read_offset = 1, 2
    seq.data.num_computed_tokens = 4
    return seq


def snapshot(seq: Sequence) -> tuple:
    return (
        seq.status,
        list(seq.get_token_ids()),
        seq.cumulative_logprob,
        list(seq.block_table),
        seq.output_text,
        None if seq.tokens is None else list(seq.tokens),
        (seq.prefix_offset, seq.read_offset),
        [{k: (v.logprob, v.rank) for k, v in d.items()} for d in seq.output_logprobs],
        seq.data.num_computed_tokens,
        seq.stop_reason,
    )


def mutate(seq: Sequence) -> None:
    """Touch every piece of mutable state, including the objects inside the lists."""
    seq.append_token_id(99, -3.0, {99: Logprob(-3.0)})
    seq.data.num_computed_tokens += 1
    seq.block_table.append(77)
    seq.block_table[0] = 55
    seq.output_text += "zz"
    seq.tokens.append("zz")
    seq.prefix_offset += 1
    seq.output_logprobs[0][12345] = Logprob(-9.0)
    seq.status = S.FINISHED_STOPPED
    seq.stop_reason = "zz"


def test_new_sequence_state():
    seq = Sequence(3, "p", [5, 6])
    assert seq.status == S.WAITING and not seq.is_finished()
    assert seq.block_table == [] and seq.output_text == "" and seq.output_logprobs == []
    assert seq.get_token_ids() == [5, 6] and seq.get_last_token_id() == 6 and seq.get_prompt_len() == 2


def test_append_token_id_records_logprobs_only_when_given():
    seq = Sequence(0, None, [1])
    seq.append_token_id(2, -1.0)
    assert seq.output_logprobs == [] and seq.cumulative_logprob == -1.0 and seq.get_output_len() == 1
    seq.append_token_id(3, -1.0, {3: Logprob(-1.0)})
    assert len(seq.output_logprobs) == 1


def test_fork_copies_everything():
    seq = make_seq()
    child = seq.fork(5)
    assert child.seq_id == 5 and child.prompt == seq.prompt
    assert snapshot(child) == snapshot(seq)


def test_mutating_the_fork_leaves_the_original_untouched():
    seq = make_seq()
    before = snapshot(seq)
    child = seq.fork(1)
    mutate(child)
    assert snapshot(seq) == before
    assert snapshot(child) != before  # the mutation did happen, on the fork


def test_mutating_the_original_leaves_the_fork_untouched():
    seq = make_seq()
    child = seq.fork(1)
    before = snapshot(child)
    mutate(seq)
    assert snapshot(child) == before


def test_fork_shares_no_mutable_object():
    seq = make_seq()
    child = seq.fork(1)
    pairs = [
        (seq.data, child.data),
        (seq.get_token_ids(), child.get_token_ids()),
        (seq.data.output_token_ids, child.data.output_token_ids),
        (seq.block_table, child.block_table),
        (seq.tokens, child.tokens),
        (seq.output_logprobs, child.output_logprobs),
        *zip(seq.output_logprobs, child.output_logprobs),
    ]
    for a, b in pairs:
        assert a is not b


def test_fork_of_a_fresh_sequence():
    seq = Sequence(0, "p", [1, 2])
    child = seq.fork(1)
    assert child.tokens is None and child.status == S.WAITING
    child.append_token_id(3)
    assert seq.get_token_ids() == [1, 2]


# ---------------------------------------------------------------------------------------------
# SequenceStatus
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", list(S))
def test_is_finished(status):
    assert S.is_finished(status) == (status in FINISHED)


@pytest.mark.parametrize(
    "status, reason",
    [
        (S.WAITING, None),
        (S.RUNNING, None),
        (S.SWAPPED, None),
        (S.FINISHED_STOPPED, "stop"),
        (S.FINISHED_LENGTH_CAPPED, "length"),
        (S.FINISHED_ABORTED, "abort"),
        (S.FINISHED_IGNORED, "length"),  # vLLM reports an ignored prompt as "length"
    ],
)
def test_finished_reason(status, reason):
    assert S.get_finished_reason(status) == reason


def test_every_finished_state_has_a_reason():
    assert set(FINISHED) | set(UNFINISHED) == set(S)
    for status in FINISHED:
        assert S.get_finished_reason(status) is not None


def test_status_lifecycle():
    """WAITING -> RUNNING -> (preempted) WAITING -> RUNNING -> SWAPPED -> RUNNING -> FINISHED."""
    seq = Sequence(0, None, [1, 2])
    path = [S.WAITING, S.RUNNING, S.WAITING, S.RUNNING, S.SWAPPED, S.RUNNING]
    for status in path:
        seq.status = status
        assert not seq.is_finished()
    for final in FINISHED:
        seq.status = final
        assert seq.is_finished()


# ---------------------------------------------------------------------------------------------
# Request
# ---------------------------------------------------------------------------------------------


def make_request(n: int = 3) -> Request:
    first = Sequence(0, "hi", [1, 2, 3])
    seqs = [first] + [first.fork(i) for i in range(1, n)]
    return Request("req-0", seqs, SamplingParams(n=n), arrival_time=12.5)


def test_request_basics():
    req = make_request()
    assert req.prompt == "hi" and req.prompt_token_ids == (1, 2, 3)
    assert req.arrival_time == 12.5 and req.sampling_params.n == 3
    assert req.num_seqs() == 3


def test_request_needs_a_sequence():
    with pytest.raises(ValueError, match="at least one Sequence"):
        Request("r", [], SamplingParams())


def test_arrival_time_defaults_to_now():
    import time

    t0 = time.monotonic()
    req = Request("r", [Sequence(0, None, [1])], SamplingParams())
    assert t0 <= req.arrival_time <= time.monotonic()


def test_get_seqs_filters_by_status():
    req = make_request(4)
    s0, s1, s2, s3 = req.seqs
    s0.status = s1.status = S.RUNNING
    s2.status = S.FINISHED_STOPPED
    assert req.get_seqs(S.RUNNING) == [s0, s1]
    assert req.get_seqs(S.WAITING) == [s3]
    assert req.get_seqs(S.FINISHED_STOPPED) == [s2]
    assert req.get_seqs(S.SWAPPED) == []
    assert req.get_seqs() == [s0, s1, s2, s3]
    assert req.num_seqs(S.RUNNING) == 2


def test_get_seqs_returns_a_new_list():
    req = make_request()
    req.get_seqs().clear()
    assert req.num_seqs() == 3


def test_request_finishes_when_every_sequence_has():
    req = make_request()
    for i, seq in enumerate(req.seqs):
        assert not req.is_finished()
        seq.status = FINISHED[i % len(FINISHED)]
    assert req.is_finished()


def test_add_and_remove():
    req = make_request(2)
    req.add(req.seqs[0].fork(7))
    assert [s.seq_id for s in req.get_seqs()] == [0, 1, 7]
    req.remove(1)
    assert [s.seq_id for s in req.get_seqs()] == [0, 7]


# ---------------------------------------------------------------------------------------------
# Outputs: vLLM's field names.
# ---------------------------------------------------------------------------------------------


def test_output_field_names_are_vllms():
    import dataclasses

    completion = [f.name for f in dataclasses.fields(CompletionOutput)]
    assert completion[:6] == ["index", "text", "token_ids", "cumulative_logprob", "logprobs", "finish_reason"]
    request = [f.name for f in dataclasses.fields(RequestOutput)]
    assert request[:5] == ["request_id", "prompt", "prompt_token_ids", "outputs", "finished"]


def test_completion_output_finished():
    out = CompletionOutput(0, "a", [1], -0.5, None)
    assert not out.finished()
    out.finish_reason = S.get_finished_reason(S.FINISHED_STOPPED)
    assert out.finished()
    assert RequestOutput("r", None, [1]).outputs == []  # a fresh list per object
    assert RequestOutput("r", None, [1]).outputs is not RequestOutput("r", None, [1]).outputs
