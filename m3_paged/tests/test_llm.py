"""m3's engine: the same tokens as m2 (and so m1 and HF) under paging, prefix caching,
preemption and chunked prefill; forks share prompt blocks."""

from __future__ import annotations

import pytest

import m2_kvcache
from m0_config.sequence import SequenceStatus
from m0_config.toy import TOY_PROMPTS
from m3_paged import LLM, BeamSearchParams, SamplingParams

pytestmark = pytest.mark.m3

PROMPTS = list(TOY_PROMPTS)
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
GPU_KV_BYTES = 1 << 28  # GPU tests build several engines in one process: each gets a fixed budget


def _tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def m2_greedy(qwen3_dir):
    return _tokens(m2_kvcache.LLM(qwen3_dir).generate(PROMPTS, GREEDY, use_tqdm=False))


def test_greedy_equals_m2_all_archs(toy_arch_dir):
    m2 = m2_kvcache.LLM(toy_arch_dir).generate(PROMPTS, GREEDY, use_tqdm=False)
    m3 = LLM(toy_arch_dir, max_num_seqs=3, block_size=4).generate(PROMPTS, GREEDY, use_tqdm=False)
    assert _tokens(m3) == _tokens(m2)


def test_sparse_moe_config_paged_and_chunked_equals_m2(toy_model_dir):
    """The MoE toy's other config (dense layer 0, top-3 of 5 experts, not renormalised; m2 checks it
    against HF), with prompts split into chunks of at most 8 tokens over 4-token blocks."""
    path = toy_model_dir(
        "qwen3_moe", decoder_sparse_step=2, mlp_only_layers=[], num_experts=5, num_experts_per_tok=3,
        norm_topk_prob=False,
    )  # fmt: skip
    m2 = m2_kvcache.LLM(path, max_num_seqs=2).generate(PROMPTS, GREEDY, use_tqdm=False)
    m3 = LLM(path, block_size=4, max_num_batched_tokens=8, max_num_seqs=3)
    assert _tokens(m3.generate(PROMPTS, GREEDY, use_tqdm=False)) == _tokens(m2)


@pytest.mark.parametrize("block_size", [1, 8, 16, 64])
def test_block_sizes(qwen3_dir, m2_greedy, block_size):
    llm = LLM(qwen3_dir, block_size=block_size)
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == m2_greedy


def test_prefix_caching_on_equals_off_and_hits(qwen3_dir, m2_greedy):
    off = LLM(qwen3_dir, block_size=4, enable_prefix_caching=False)
    on = LLM(qwen3_dir, block_size=4, enable_prefix_caching=True)
    assert _tokens(off.generate(PROMPTS, GREEDY, use_tqdm=False)) == m2_greedy
    assert _tokens(on.generate(PROMPTS, GREEDY, use_tqdm=False)) == m2_greedy
    stats = on.llm_engine.scheduler.block_manager.stats
    # Prompts admitted in the same step cannot hit each other: blocks are hashed once computed.
    first_hits = stats.hits
    assert _tokens(on.generate(PROMPTS, GREEDY, use_tqdm=False)) == m2_greedy  # now mostly from cache
    assert stats.hits > first_hits and stats.hit_rate > 0
    assert off.llm_engine.scheduler.block_manager.stats.hits == 0


def test_preemption_equals_ample_pool(qwen3_dir, m2_greedy):
    # 12 blocks of 4 tokens: far less than 6 sequences of up to ~40 tokens need at once.
    llm = LLM(qwen3_dir, block_size=4, num_gpu_blocks_override=12, max_num_seqs=6)
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == m2_greedy
    sched = llm.llm_engine.scheduler
    assert sched.num_preemptions > 0
    assert sched.block_manager.get_num_free_blocks() == 12


def test_prefix_hits_chunks_preemption_and_forks_at_once_equal_m2(qwen3_dir, spy_chunks):
    """Every mechanism in one run: repeated and shared-prefix prompts (hits), a 6-token budget
    (chunks), 14 blocks of 4 (preemption) and a seeded n=2 request (forks); twice, so the second
    run starts from a warm cache."""
    prompts = [*PROMPTS, PROMPTS[2], PROMPTS[5], *PROMPTS[:2], PROMPTS[2]]
    forks = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=12, ignore_eos=True)
    params = [GREEDY] * (len(prompts) - 1) + [forks]
    m2 = _tokens(m2_kvcache.LLM(qwen3_dir, max_num_seqs=4).generate(prompts, params, use_tqdm=False))
    llm = LLM(qwen3_dir, block_size=4, num_gpu_blocks_override=14, max_num_seqs=4, max_num_batched_tokens=6)
    chunked = spy_chunks(llm.llm_engine)
    for _ in range(2):
        assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == m2
    sched = llm.llm_engine.scheduler
    assert sched.num_preemptions > 0 and sched.block_manager.stats.hits > 0 and any(chunked)
    assert sched.block_manager.get_num_free_blocks() == 14


@pytest.mark.parametrize("budget", [3, 8])
def test_chunked_prefill_equals_unchunked(qwen3_dir, m2_greedy, spy_chunks, budget):
    llm = LLM(qwen3_dir, block_size=4, max_num_batched_tokens=budget, max_num_seqs=3)
    chunked = spy_chunks(llm.llm_engine)
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == m2_greedy
    assert any(chunked)  # some steps really computed a non-final chunk


def test_unchunked_mode(qwen3_dir, m2_greedy):
    llm = LLM(qwen3_dir, enable_chunked_prefill=False, max_num_batched_tokens=512)
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == m2_greedy


def test_sampling_features_equal_m2(qwen3_dir):
    params = [
        SamplingParams(n=2, best_of=3, temperature=0.9, seed=5, max_tokens=10),
        SamplingParams(temperature=0.7, top_p=0.8, top_k=20, seed=9, max_tokens=12, logprobs=2),
        SamplingParams(n=3, temperature=1.0, seed=1, repetition_penalty=1.3, max_tokens=8),
        SamplingParams(temperature=0, max_tokens=9, stop_token_ids=[260]),
    ]
    prompts = PROMPTS[:4]
    m2 = m2_kvcache.LLM(qwen3_dir).generate(prompts, params, use_tqdm=False)
    m3 = LLM(qwen3_dir, block_size=4).generate(prompts, params, use_tqdm=False)
    assert _tokens(m3) == _tokens(m2)
    for a, b in zip(m2, m3):
        for x, y in zip(a.outputs, b.outputs):
            assert y.cumulative_logprob == pytest.approx(x.cumulative_logprob, abs=1e-3)


def test_beam_search_equals_m2(qwen3_dir):
    bp = BeamSearchParams(beam_width=3, max_tokens=6)
    a = m2_kvcache.LLM(qwen3_dir).beam_search(["The model"], bp)[0]
    llm = LLM(qwen3_dir, block_size=4)
    b = llm.beam_search(["The model"], bp)[0]
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert llm.llm_engine.scheduler.block_manager.stats.hits > 0  # beams reuse the cached prefix


def test_forks_share_prompt_blocks(qwen3_dir):
    llm = LLM(qwen3_dir, block_size=4)
    engine = llm.llm_engine
    bm = engine.scheduler.block_manager
    prompt = list(range(10, 20))  # 10 tokens: 2 full blocks + a partial one
    engine.add_request(
        "r", None, prompt, SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=4, ignore_eos=True)
    )
    engine.step()  # prefill of the first candidate only
    req = engine.scheduler.running[0]
    parent, *children = req.seqs
    assert all(c.block_table == parent.block_table for c in children)
    full = parent.block_table[:2]
    assert [bm.blocks[b].ref_count for b in full] == [3, 3]
    assert bm.num_blocks - bm.get_num_free_blocks() == 3  # one copy of the prompt, shared three ways
    engine.step()  # children recompute the last prompt token into private copies of the partial block
    assert all(c.block_table[:2] == full for c in children)
    assert len({s.block_table[2] for s in req.seqs}) == 3
    while engine.has_unfinished_requests():
        engine.step()
    assert bm.get_num_free_blocks() == bm.num_blocks


def test_prompt_that_can_never_fit_is_refused_or_finished_not_looped(qwen3_dir):
    llm = LLM(qwen3_dir, block_size=4, num_gpu_blocks_override=3)
    with pytest.raises(ValueError, match="8 KV blocks of 4, but the cache holds 3 blocks"):
        llm.generate(
            [list(range(1, 30)), [5, 6]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False
        )
    engine = llm.llm_engine  # past the LLM's check, the scheduler finishes it instead of looping
    engine.add_request("big", None, list(range(1, 30)), SamplingParams(temperature=0, max_tokens=3))
    engine.add_request("ok", None, [5, 6], SamplingParams(temperature=0, max_tokens=3))
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step()})
    assert outs["big"].outputs[0].finish_reason == "length" and outs["big"].outputs[0].token_ids == []
    assert len(outs["ok"].outputs[0].token_ids) == 3


def test_is_prefill_is_explicit(qwen3_dir):
    llm = LLM(qwen3_dir, block_size=4, max_num_batched_tokens=4, max_num_seqs=4)
    engine = llm.llm_engine
    engine.add_request(
        "r", None, list(range(10, 20)), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    )
    engine.step()
    seq = engine.scheduler.running[0].seqs[0]
    assert seq.is_prefill and seq.data.num_computed_tokens == 4 and seq.get_output_len() == 0
    engine.step()
    engine.step()  # 10 tokens in chunks of 4, 4, 2: the last chunk samples
    assert not seq.is_prefill and seq.get_output_len() == 1
    assert seq.status == SequenceStatus.RUNNING


def test_kv_cache_usage_counts_shared_blocks_once(qwen3_dir):
    """Three candidates share the prompt's 3 blocks: its 10 tokens are held once, not three times."""
    engine = LLM(qwen3_dir, block_size=4).llm_engine
    params = SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=4, ignore_eos=True)
    engine.add_request("r", None, list(range(10, 20)), params)
    engine.step()  # the prompt, then two forks of it (9 tokens computed each, all in the shared blocks)
    usage = engine.kv_cache_usage()
    per_token = engine.config.model_config.kv_cache_bytes_per_token()
    assert (usage.used_bytes, usage.reserved_bytes) == (10 * per_token, 12 * per_token)


def test_kv_cache_usage_wastes_at_most_a_block_per_sequence(qwen3_dir):
    llm = LLM(qwen3_dir, block_size=8)
    engine = llm.llm_engine
    engine.add_request(
        "r", None, list(range(10, 21)), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    )
    engine.step()
    usage = engine.kv_cache_usage()
    per_token = engine.config.model_config.kv_cache_bytes_per_token()
    assert usage.used_bytes == 11 * per_token and usage.reserved_bytes == 16 * per_token


# ---- GPU (marker gpu): the Triton backend and the whole engine on CUDA ---------------------------


@pytest.mark.gpu
def test_gpu_engine_equals_m2_and_torch_backend(toy_arch_dir):
    """float32 on CUDA: m3 with the Triton kernels equals m3 with the torch path and m2."""
    kw = dict(device="cuda", dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    budget = dict(kv_cache_memory_bytes=GPU_KV_BYTES)  # several engines share the GPU in one process
    m2 = _tokens(m2_kvcache.LLM(toy_arch_dir, **kw).generate(PROMPTS, params, use_tqdm=False))
    for backend in ("triton", "torch"):
        llm = LLM(
            toy_arch_dir,
            block_size=16,
            attention_backend=backend,
            max_num_batched_tokens=32,
            max_num_seqs=8,
            **budget,
            **kw,
        )
        assert llm.llm_engine.model_runner.attn_backend.name == backend
        assert _tokens(llm.generate(PROMPTS, params, use_tqdm=False)) == m2


@pytest.mark.gpu
def test_gpu_preemption_and_prefix_cache(qwen3_dir):
    kw = dict(device="cuda", dtype="float32", block_size=16, kv_cache_memory_bytes=GPU_KV_BYTES)
    m2_greedy = _tokens(
        m2_kvcache.LLM(qwen3_dir, device="cuda", dtype="float32").generate(PROMPTS, GREEDY, use_tqdm=False)
    )
    tight = LLM(qwen3_dir, num_gpu_blocks_override=6, max_num_seqs=6, **kw)
    assert _tokens(tight.generate(PROMPTS, GREEDY, use_tqdm=False)) == m2_greedy
    assert tight.llm_engine.scheduler.num_preemptions > 0
    cached = LLM(qwen3_dir, **{**kw, "block_size": 4})  # the toy prompts are shorter than 16 tokens
    cached.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert _tokens(cached.generate(PROMPTS, GREEDY, use_tqdm=False)) == m2_greedy
    assert cached.llm_engine.scheduler.block_manager.stats.hits > 0


def test_held_back_fork_request_does_not_crash(qwen3_dir):
    """A request with n > 1 that must wait (max_num_seqs) plans its forks only once admitted."""
    llm = LLM(qwen3_dir, block_size=4, max_num_seqs=2)
    params = [
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
        SamplingParams(n=2, temperature=1.0, seed=0, max_tokens=3),
    ]
    outs = llm.generate([[5, 6, 7, 8, 9], [10, 11, 12]], params, use_tqdm=False)
    assert len(outs[0].outputs[0].token_ids) == 5 and [len(o.token_ids) for o in outs[1].outputs] == [3, 3]


def test_fork_request_larger_than_the_pool_finishes(qwen3_dir):
    """n=3 sequences that cannot all live in 9 blocks once they diverge: after preempting itself
    the request is finished with what it has, never looped on."""
    llm = LLM(qwen3_dir, block_size=4, num_gpu_blocks_override=9)
    sp = SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=12, ignore_eos=True)
    out = llm.generate([list(range(10, 20))], sp, use_tqdm=False)[0]
    # "length" is also max_tokens' reason: the request must really have been cut short
    assert all(o.finish_reason == "length" and len(o.token_ids) < 12 for o in out.outputs)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert llm.llm_engine.scheduler.block_manager.get_num_free_blocks() == 9


def test_fork_of_a_finished_candidate_longer_than_the_pool_still_runs(qwen3_dir):
    """best_of=2, max_tokens=1, a 4-token prompt in 4 one-token blocks: the first candidate finishes
    with 5 tokens; its fork, short of a block for its copy-on-write, preempts itself and must run
    again (4 blocks suffice), not be finished with no token because the finished candidate would
    not fit."""
    llm = LLM(qwen3_dir, block_size=1, num_gpu_blocks_override=4, max_num_batched_tokens=2, max_num_seqs=2)
    sp = SamplingParams(n=2, best_of=2, temperature=1.0, seed=0, max_tokens=1, ignore_eos=True)
    out = llm.generate([[5, 6, 7, 8]], sp, use_tqdm=False)[0]
    assert [len(o.token_ids) for o in out.outputs] == [1, 1]
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert llm.llm_engine.scheduler.block_manager.get_num_free_blocks() == 4
