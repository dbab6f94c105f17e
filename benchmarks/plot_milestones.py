"""The milestone throughput plot of docs/benchmarks.md, from the JSON lines the throughput benchmark
printed on the GPU (kept in benchmarks/results/, one file per machine and date).

    python -m benchmarks.plot_milestones benchmarks/results/h100_2026-11-22.jsonl docs/img/throughput_milestones.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORDER = ["hf", "m1_sampling", "m2_kvcache", "m3_paged", "m4_cudagraph", "m5_tp"]


def load(path: str) -> list[dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip().startswith("{")]
    rows = [r for r in rows if r.get("milestone") in ORDER]
    return sorted(rows, key=lambda r: ORDER.index(r["milestone"]))


def label(row: dict) -> str:
    name = "HF generate" if row["milestone"] == "hf" else row["milestone"]
    if row["milestone"] == "m5_tp":
        name += f"\nTP={row.get('llm_kwargs', {}).get('tensor_parallel_size', 1)}"
    return name + ("" if row["scale"] == 1.0 else f"\n(scale {row['scale']})")


def plot(rows: list[dict], out: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    values = [r["tokens_per_s"] for r in rows]
    bars = ax.bar([label(r) for r in rows], values, color="#4C72B0")
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("output tokens / s (log scale)")
    ax.set_title(f"nano-vllm workload, Qwen3-0.6B shape, bf16, {rows[0]['device']}", fontsize=10)
    ax.axhline(20_000, color="grey", linestyle="--", linewidth=1)
    ax.text(-0.4, 21_500, "issue 8 target: 20,000", fontsize=8, color="grey")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    plot(load(sys.argv[1]), sys.argv[2])
