"""The pictures of docs/m2_kvcache.md, drawn from a real run of the m2 engine on a toy checkpoint.

    .venv/bin/python docs/scripts/plot_m2_kvcache.py          # writes docs/img/m2_*.png

Ragged requests (random prompt and output lengths, more requests than cache slots) go through
m2's `LLMEngine`; after every `step()` the script records which request holds each slot and what
`LLMEngine.kv_cache_usage()` reports. The only addition to the engine is a scheduler subclass that
keeps each step's `SchedulerOutput` (plugged in through the engine's `scheduler_cls` extension
point); nothing of the engine is reimplemented here.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from dataclasses import dataclass

import matplotlib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)  # run as a plain script from anywhere: the milestone packages live at the root

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from m0_config.config import EngineConfig  # noqa: E402
from m0_config.sampling_params import SamplingParams  # noqa: E402
from m0_config.toy import toy_checkpoint  # noqa: E402
from m2_kvcache.llm_engine import LLMEngine  # noqa: E402
from m2_kvcache.scheduler import Scheduler, SchedulerOutput  # noqa: E402

IMG_DIR = os.path.join(ROOT, "docs", "img")


class RecordingScheduler(Scheduler):
    """m2's scheduler, unchanged, that also keeps every SchedulerOutput it returns and which
    sequence owned each slot during that step."""

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self.history: list[tuple[SchedulerOutput, dict[int, int]]] = []

    def schedule(self) -> SchedulerOutput:
        out = super().schedule()
        self.history.append((out, {slot: seq_id for seq_id, slot in self.slot_of.items()}))
        return out


class RecordingEngine(LLMEngine):
    scheduler_cls = RecordingScheduler


@dataclass
class StepRecord:
    is_prefill: bool
    num_tokens: int  # tokens fed to the model in this step
    slot_owner: dict[int, str]  # slot -> request id, for every slot owned during this step
    scheduled_slots: set[int]  # the slots whose sequence was fed to the model in this step
    reserved_bytes: int  # after the step
    used_bytes: int


def run(num_requests: int, num_slots: int, max_model_len: int, seed: int) -> tuple[list[StepRecord], int]:
    """Drive the engine to completion; one StepRecord per engine step, and the bytes per token."""
    config = EngineConfig.from_llm_kwargs(
        toy_checkpoint("qwen3"),
        max_num_seqs=num_slots,
        max_model_len=max_model_len,
        enable_chunked_prefill=False,
        device="cpu",
    )
    engine = RecordingEngine(config)
    rng = random.Random(seed)
    for i in range(num_requests):
        prompt = [rng.randrange(10, 400) for _ in range(rng.randint(4, 48))]
        params = SamplingParams(temperature=0, max_tokens=rng.randint(4, 64), ignore_eos=True)
        engine.add_request(f"r{i}", None, prompt, params)
    owner = {}  # seq_id -> request id
    for req in engine.scheduler.waiting:
        owner.update({s.seq_id: req.request_id for s in req.seqs})
    records = []
    while engine.has_unfinished_requests():
        engine.step()
        so, slot_to_seq = engine.scheduler.history[-1]
        usage = engine.kv_cache_usage()
        records.append(
            StepRecord(
                is_prefill=so.is_prefill,
                num_tokens=sum(so.num_scheduled_tokens),
                slot_owner={slot: owner[seq_id] for slot, seq_id in slot_to_seq.items()},
                scheduled_slots=set(so.slot_ids),
                reserved_bytes=usage.reserved_bytes,
                used_bytes=usage.used_bytes,
            )
        )
    return records, config.model_config.kv_cache_bytes_per_token()


def plot_slots(records: list[StepRecord], num_slots: int, path: str) -> None:
    """Slot occupancy: one row per slot, one column per engine step, coloured by request; pale where
    the slot is held but its sequence sits out the step (another request's prefill step)."""
    requests = sorted({r for rec in records for r in rec.slot_owner.values()}, key=lambda r: int(r[1:]))
    palette = list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("Dark2").colors)
    colour = {r: palette[i % len(palette)] for i, r in enumerate(requests)}
    fig, ax = plt.subplots(figsize=(11, 0.55 * num_slots + 1.8))
    for step, rec in enumerate(records):
        for slot, req in rec.slot_owner.items():
            active = slot in rec.scheduled_slots
            ax.add_patch(
                plt.Rectangle(
                    (step, slot + 0.1), 1, 0.8, color=colour[req], alpha=1.0 if active else 0.25, lw=0
                )
            )
            if active and rec.is_prefill:  # the step that wrote the whole prompt into the slot
                ax.add_patch(plt.Rectangle((step, slot + 0.1), 1, 0.8, fill=False, hatch="////", lw=0))
    # Label each request once, where it first appears.
    seen = set()
    for step, rec in enumerate(records):
        for slot, req in rec.slot_owner.items():
            if req not in seen:
                seen.add(req)
                ax.text(step + 1.3, slot + 0.5, req, va="center", fontsize=8, color="white", weight="bold")
    ax.set_xlim(0, len(records))
    ax.set_ylim(0, num_slots)
    ax.set_yticks([s + 0.5 for s in range(num_slots)], [f"slot {s}" for s in range(num_slots)])
    ax.invert_yaxis()
    ax.set_xlabel("engine step")
    num_prefill = sum(r.is_prefill for r in records)
    ax.set_title(
        f"m2 continuous batching: {len(requests)} ragged requests over {num_slots} cache slots "
        f"({num_prefill} prefill steps, {len(records) - num_prefill} decode steps)"
    )
    ax.legend(
        handles=[
            Patch(facecolor="lightgrey", hatch="////", label="prefill step (whole prompt)"),
            Patch(facecolor="grey", label="decode step (one token)"),
            Patch(facecolor="grey", alpha=0.25, label="slot held, sequence idle (a prefill step)"),
            Patch(facecolor="white", edgecolor="grey", label="free slot"),
        ],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.16),
        ncol=4,
        frameon=False,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_memory(records: list[StepRecord], bytes_per_token: int, path: str) -> None:
    """Reserved vs used KV-cache bytes after every step, from LLMEngine.kv_cache_usage()."""
    steps = range(1, len(records) + 1)
    kib = 1024
    reserved = [r.reserved_bytes / kib for r in records]
    used = [r.used_bytes / kib for r in records]
    fig, ax = plt.subplots(figsize=(11, 3.8))
    ax.fill_between(steps, used, reserved, step="post", color="tab:red", alpha=0.25, label="reserved, unused")
    ax.fill_between(steps, 0, used, step="post", color="tab:blue", alpha=0.7, label="holding tokens")
    ax.step(steps, reserved, where="post", color="tab:red", lw=1.5, label="reserved by the slots")
    mean_used = sum(r.used_bytes for r in records) / sum(r.reserved_bytes for r in records)
    ax.set_xlabel("engine step")
    ax.set_ylabel("KV cache (KiB)")
    ax.set_xlim(1, len(records))
    ax.set_ylim(0, reserved[0] * 1.08)
    ax.set_title(
        f"m2 contiguous KV cache, reserved vs used ({bytes_per_token} B/token on the toy model): "
        f"{mean_used:.0%} used on average"
    )
    ax.legend(loc="upper right", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--max-model-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=IMG_DIR)
    args = p.parse_args()
    records, bytes_per_token = run(args.requests, args.slots, args.max_model_len, args.seed)
    os.makedirs(args.out, exist_ok=True)
    plot_slots(records, args.slots, os.path.join(args.out, "m2_slot_occupancy.png"))
    plot_memory(records, bytes_per_token, os.path.join(args.out, "m2_kv_cache_usage.png"))
    num_prefill = sum(r.is_prefill for r in records)
    mean_used = sum(r.used_bytes for r in records) / sum(r.reserved_bytes for r in records)
    print(
        f"{len(records)} steps ({num_prefill} prefill), {bytes_per_token} B/token, "
        f"{mean_used:.1%} of the reserved bytes used on average; images in {args.out}"
    )


if __name__ == "__main__":
    main()
