"""The pictures of docs/m3_paged.md, drawn from real runs of the m3 engine on a toy checkpoint.

    .venv/bin/python docs/scripts/plot_m3_paged.py          # writes docs/img/m3_*.png

Requests that share a long "system prompt" go through m3's `LLMEngine` with a small block pool
and a small token budget, so that prefix hits, chunked prefill and preemption all happen. After
every step the script records the state of every physical block (who holds it, whether it is a
free block that still caches a prefix), what the step computed, and `LLMEngine.kv_cache_usage()`.
The same requests also go through m2's engine, to compare its reserved slots with m3's blocks.
The only addition to the engines is an m3 scheduler subclass that keeps what `schedule` returned
and takes a snapshot after `update_from_output` (plugged in through `scheduler_cls`); nothing of
the engines is reimplemented here.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from dataclasses import dataclass, field

import matplotlib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)  # run as a plain script from anywhere: the milestone packages live at the root

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

import m2_kvcache.llm_engine  # noqa: E402
from m0_config.config import EngineConfig  # noqa: E402
from m0_config.sampling_params import SamplingParams  # noqa: E402
from m0_config.sequence import SequenceStatus  # noqa: E402
from m0_config.toy import toy_checkpoint  # noqa: E402
from m3_paged.llm_engine import LLMEngine  # noqa: E402
from m3_paged.scheduler import Scheduler, SchedulerOutput  # noqa: E402

IMG_DIR = os.path.join(ROOT, "docs", "img")
FREE, CACHED, SHARED = "free", "cached", "shared"


@dataclass
class StepRecord:
    rows: list[tuple[str, int, str]]  # (request id, tokens computed, "decode" | "chunk" | "final")
    num_preempted: int
    blocks: list[str] = field(default_factory=list)  # per block: FREE, CACHED, SHARED or a request id
    reserved_bytes: int = 0  # blocks in use, after the step
    used_bytes: int = 0  # tokens held by running sequences, after the step


class RecordingScheduler(Scheduler):
    """m3's scheduler, unchanged, that keeps one StepRecord per step."""

    def __init__(self, config: EngineConfig, num_blocks: int):
        super().__init__(config, num_blocks)
        self.history: list[StepRecord] = []
        self.owner: dict[int, str] = {}  # seq_id -> request id

    def add_request(self, request) -> None:
        self.owner.update({s.seq_id: request.request_id for s in request.seqs})
        super().add_request(request)

    def schedule(self) -> SchedulerOutput:
        out = super().schedule()
        rows = []
        for seq, n, samples in zip(out.seqs, out.num_scheduled_tokens, out.samples):
            # is_prefill is the explicit flag, read before the step runs.
            kind = "decode" if not seq.is_prefill else ("final" if samples else "chunk")
            rows.append((self.owner[seq.seq_id], n, kind))
        self.history.append(StepRecord(rows, out.num_preempted))
        return out

    def update_from_output(self, so: SchedulerOutput) -> None:
        super().update_from_output(so)
        bm = self.block_manager
        holders: dict[int, set[str]] = {}
        for req in self.running:
            for seq in req.seqs:
                for b in seq.block_table:
                    holders.setdefault(b, set()).add(req.request_id)
        state = []
        for block in bm.blocks:
            if block.ref_count == 0:
                state.append(CACHED if block.hash is not None else FREE)
            elif len(holders.get(block.block_id, ())) > 1:
                state.append(SHARED)
            else:
                state.append(next(iter(holders[block.block_id])))
        self.history[-1].blocks = state


class RecordingEngine(LLMEngine):
    scheduler_cls = RecordingScheduler


def workload(num_requests: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt, max_tokens): a 20-token shared prefix, then 3-16 tokens of the request's own."""
    rng = random.Random(seed)
    system = [rng.randrange(10, 400) for _ in range(20)]
    return [
        (system + [rng.randrange(10, 400) for _ in range(rng.randint(3, 16))], rng.randint(6, 30))
        for _ in range(num_requests)
    ]


def run_m3(reqs, block_size: int, num_blocks: int, budget: int, max_num_seqs: int, max_model_len: int):
    config = EngineConfig.from_llm_kwargs(
        toy_checkpoint("qwen3"),
        block_size=block_size,
        num_gpu_blocks_override=num_blocks,
        max_num_batched_tokens=budget,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        device="cpu",
    )
    engine = RecordingEngine(config)
    for i, (prompt, max_tokens) in enumerate(reqs):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        engine.add_request(f"r{i}", None, prompt, params)
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o.outputs[0].token_ids for o in engine.step()})
        usage = engine.kv_cache_usage()
        engine.scheduler.history[-1].reserved_bytes = usage.reserved_bytes
        engine.scheduler.history[-1].used_bytes = logical_bytes(engine)
    return engine, outputs


def logical_bytes(engine: LLMEngine) -> int:
    """The running sequences' computed tokens, a shared prefix counted once per sequence (the engine's
    `kv_cache_usage().used_bytes` counts a shared block once): the gap to the blocks in use shows
    what sharing saves."""
    seqs = [s for r in engine.scheduler.running for s in r.get_seqs(SequenceStatus.RUNNING)]
    per_token = engine.config.model_config.kv_cache_bytes_per_token()
    return sum(s.data.num_computed_tokens for s in seqs) * per_token


def run_m2(reqs, max_num_seqs: int, max_model_len: int):
    config = EngineConfig.from_llm_kwargs(
        toy_checkpoint("qwen3"),
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        enable_chunked_prefill=False,
        device="cpu",
    )
    engine = m2_kvcache.llm_engine.LLMEngine(config)
    for i, (prompt, max_tokens) in enumerate(reqs):
        engine.add_request(
            f"r{i}", None, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        )
    usage, outputs = [], {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o.outputs[0].token_ids for o in engine.step()})
        u = engine.kv_cache_usage()
        usage.append((u.reserved_bytes, u.used_bytes))
    return usage, outputs


def _colours(requests: list[str]) -> dict[str, tuple]:
    palette = list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("Set2").colors)
    colour = {r: palette[i % len(palette)] for i, r in enumerate(requests)}
    colour[SHARED] = (0.15, 0.15, 0.15)
    colour[CACHED] = (0.82, 0.82, 0.82)
    colour[FREE] = (1.0, 1.0, 1.0)
    return colour


def plot_block_pool(records: list[StepRecord], requests: list[str], block_size: int, path: str) -> None:
    """One row per physical block, one column per step, coloured by who holds the block after it."""
    colour = _colours(requests)
    num_blocks = len(records[0].blocks)
    fig, ax = plt.subplots(figsize=(12, 0.16 * num_blocks + 2.2))
    for step, rec in enumerate(records):
        for b, state in enumerate(rec.blocks):
            if state != FREE:
                ax.add_patch(plt.Rectangle((step, b), 1, 1, color=colour[state], lw=0))
        if rec.num_preempted:
            ax.axvline(step + 0.5, color="red", lw=1.2, ls="--")
    ax.set_xlim(0, len(records))
    ax.set_ylim(0, num_blocks)
    ax.invert_yaxis()
    ax.set_xlabel("engine step (state after the step; red dashes: a step that preempted)")
    ax.set_ylabel("physical block id")
    ax.set_title(
        f"m3 block pool: {len(requests)} requests with a shared 20-token prefix, "
        f"{num_blocks} blocks of {block_size} tokens"
    )
    handles = [Patch(facecolor=colour[r], label=r) for r in requests]
    handles += [
        Patch(facecolor=colour[SHARED], label="shared by several requests (ref_count > 1)"),
        Patch(facecolor=colour[CACHED], label="free, still caches a prefix (revivable)"),
        Patch(facecolor="white", edgecolor="grey", label="free, empty"),
    ]
    ax.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=7, frameon=False, fontsize=8
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_step_tokens(records: list[StepRecord], budget: int, path: str) -> None:
    """Tokens computed per step, split into decode rows, non-final prefill chunks and final chunks."""
    kinds = [
        ("decode", "tab:blue", "decode rows (1 token each, sampled)"),
        ("final", "tab:green", "prefill, final chunk (samples the first token)"),
        ("chunk", "tab:orange", "prefill, non-final chunk (not sampled)"),
    ]
    fig, ax = plt.subplots(figsize=(12, 3.6))
    steps = range(len(records))
    bottom = [0] * len(records)
    for kind, c, label in kinds:
        heights = [sum(n for _, n, k in rec.rows if k == kind) for rec in records]
        ax.bar(steps, heights, bottom=bottom, color=c, width=0.85, label=label)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.axhline(budget, color="black", lw=1, ls=":", label=f"max_num_batched_tokens = {budget}")
    for step, rec in enumerate(records):
        if rec.num_preempted:
            ax.axvline(step, color="red", lw=1.2, ls="--")
    ax.set_xlim(-0.5, len(records) - 0.5)
    ax.set_ylim(0, budget * 1.5)
    ax.set_xlabel("engine step (red dashes: a step that preempted)")
    ax.set_ylabel("tokens computed")
    ax.set_title("m3 token budget: running sequences first, then waiting prompts in chunks")
    ax.legend(loc="upper right", ncol=2, frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_memory(records: list[StepRecord], m2_usage: list[tuple[int, int]], path: str) -> None:
    """KV-cache bytes per step: m2's reserved slots, m3's blocks in use, and the tokens they hold."""
    kib = 1024
    fig, ax = plt.subplots(figsize=(12, 4.2))
    ax.step(
        range(1, len(m2_usage) + 1), [r / kib for r, _ in m2_usage], where="post", color="tab:red",
        label="m2: reserved by the slots (max_num_seqs x max_model_len)",
    )  # fmt: skip
    ax.step(
        range(1, len(m2_usage) + 1), [u / kib for _, u in m2_usage], where="post", color="tab:red", ls=":",
        label="m2: tokens held",
    )  # fmt: skip
    ax.step(
        range(1, len(records) + 1), [r.reserved_bytes / kib for r in records], where="post", color="tab:blue",
        label="m3: blocks in use (shared blocks counted once)",
    )  # fmt: skip
    ax.step(
        range(1, len(records) + 1), [r.used_bytes / kib for r in records], where="post", color="tab:blue", ls=":",
        label="m3: tokens held by running sequences (a shared prefix counted per sequence)",
    )  # fmt: skip
    ax.set_xlabel("engine step")
    ax.set_ylabel("KV cache (KiB)")
    ax.set_title("the same requests through m2 (contiguous slots) and m3 (paged blocks, ample pool)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False, fontsize=8)
    ax.set_ylim(0, None)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--num-blocks", type=int, default=26)
    p.add_argument("--budget", type=int, default=24)
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--max-model-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=IMG_DIR)
    args = p.parse_args()
    reqs = workload(args.requests, args.seed)
    names = [f"r{i}" for i in range(args.requests)]
    engine, small = run_m3(
        reqs, args.block_size, args.num_blocks, args.budget, args.max_num_seqs, args.max_model_len
    )
    records = engine.scheduler.history
    ample_engine, ample = run_m3(reqs, args.block_size, 4096, 2048, args.max_num_seqs, args.max_model_len)
    m2_usage, m2_out = run_m2(reqs, args.max_num_seqs, args.max_model_len)
    assert small == ample == m2_out, "greedy tokens differ between the runs"  # the engines agree
    os.makedirs(args.out, exist_ok=True)
    plot_block_pool(records, names, args.block_size, os.path.join(args.out, "m3_block_pool.png"))
    plot_step_tokens(records, args.budget, os.path.join(args.out, "m3_step_tokens.png"))
    plot_memory(ample_engine.scheduler.history, m2_usage, os.path.join(args.out, "m3_memory_vs_m2.png"))
    stats = engine.scheduler.block_manager.stats
    m3_peak = max(r.reserved_bytes for r in ample_engine.scheduler.history)
    print(
        f"small pool: {len(records)} steps, {engine.scheduler.num_preemptions} preemptions, "
        f"{sum(k == 'chunk' for r in records for _, _, k in r.rows)} non-final chunks, prefix-cache hit rate "
        f"{stats.hit_rate:.1%} ({stats.hits}/{stats.queries} tokens); ample pool: "
        f"{len(ample_engine.scheduler.history)} steps, hit rate "
        f"{ample_engine.scheduler.block_manager.stats.hit_rate:.1%}; m2 reserves {m2_usage[0][0]} B, "
        f"m3 peaks at {m3_peak} B; images in {args.out}"
    )


if __name__ == "__main__":
    main()
