"""Make the plots of docs/m1_sampling.md from the real m1 code.

Every distribution below is computed by m1_sampling's own sampler step functions
(`apply_penalties`, `apply_temperature`, `apply_min_p`, `apply_top_k_top_p`, `Sampler`), on fixed
logits, so the pictures show what the code does. The cost plot counts the tokens m1's
`ModelRunner` really forwards while the engine generates.

    .venv/bin/python docs/scripts/plot_m1_sampling.py      # writes docs/img/m1_*.png
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the milestone packages live at the repo root

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from m0_config import SamplingParams, Sequence  # noqa: E402
from m0_config.toy import toy_checkpoint  # noqa: E402
from m1_sampling import LLM, Sampler  # noqa: E402
from m1_sampling.sampler import (  # noqa: E402
    apply_min_p,
    apply_penalties,
    apply_temperature,
    apply_top_k_top_p,
)
from m1_sampling.sampling_metadata import SamplingMetadata  # noqa: E402

IMG = ROOT / "docs" / "img"
CPU = torch.device("cpu")

# The toy distribution: ten "words", logits sorted high to low.
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "blue", "zzz"]
LOGITS = torch.tensor([3.0, 2.7, 2.3, 2.0, 1.6, 1.2, 0.8, 0.3, -0.4, -1.5])
PROMPT = [0, 4, 9]  # "the", "a", "zzz" are already in the context: the repetition penalty hits them
PARAMS = SamplingParams(repetition_penalty=1.6, temperature=0.7, min_p=0.06, top_k=5, top_p=0.8)


def metadata(params: SamplingParams, num_rows: int = 1) -> SamplingMetadata:
    """The real SamplingMetadata of `num_rows` identical rows with PROMPT as their prompt."""
    seqs = [Sequence(i, None, PROMPT) for i in range(num_rows)]
    return SamplingMetadata.from_sequences(seqs, [params] * num_rows, [None] * num_rows, [], len(WORDS), CPU)


def sampler_steps() -> list[tuple[str, torch.Tensor]]:
    """(title, logits) after each of the sampler's steps, in vLLM's order."""
    md = metadata(PARAMS)
    x = LOGITS.unsqueeze(0).clone()  # (1, vocab)
    steps = [("1. raw: softmax(logits)", x)]
    x = apply_penalties(x, md)
    steps.append((f"2. repetition penalty {PARAMS.repetition_penalty}\n(prompt: the, a, zzz)", x))
    x = apply_temperature(x, md.temperatures)
    steps.append((f"3. temperature {PARAMS.temperature}", x))
    x = apply_min_p(x, md.min_ps)
    steps.append((f"4. min_p {PARAMS.min_p}: p >= {PARAMS.min_p} * max(p)", x))
    x = apply_top_k_top_p(x, md.top_ks, None)
    steps.append((f"5. top_k {PARAMS.top_k}", x))
    x = apply_top_k_top_p(x, None, md.top_ps)
    steps.append((f"6. top_p {PARAMS.top_p} (keeps the token that crosses p)", x))
    # One call with both filters, as the Sampler makes it, gives the same logits.
    both = apply_top_k_top_p(steps[3][1], md.top_ks, md.top_ps)
    assert torch.equal(both, x), "top-k then top-p in two calls must equal the one call"
    return [(title, logits[0]) for title, logits in steps]


def bar_panel(ax, probs: torch.Tensor, previous: torch.Tensor | None, title: str) -> None:
    kept = probs > 0
    colors = ["tab:blue" if k else "lightgrey" for k in kept.tolist()]
    ax.bar(WORDS, probs.tolist(), color=colors)
    if previous is not None:  # the step before, as an outline, so the change is visible
        ax.bar(WORDS, previous.tolist(), fill=False, edgecolor="black", linestyle=":", linewidth=1)
    for i, p in enumerate(probs.tolist()):
        ax.text(i, p + 0.01, f"{p:.2f}" if p > 0 else "x", ha="center", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, 0.62)
    ax.tick_params(axis="x", labelsize=8, rotation=45)


def plot_sampler_steps() -> torch.Tensor:
    steps = sampler_steps()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharey=True)
    previous = None
    for ax, (title, logits) in zip(axes.flat, steps):
        probs = logits.softmax(-1)
        bar_panel(ax, probs, previous, title)
        previous = probs
    axes[0, 0].set_ylabel("probability")
    axes[1, 0].set_ylabel("probability")
    fig.suptitle("One distribution through m1's sampler (dotted: the step before; grey/x: removed)")
    fig.tight_layout()
    fig.savefig(IMG / "m1_sampler_steps.png", dpi=110)
    plt.close(fig)
    return steps[-1][1].softmax(-1)


def plot_draws(final_probs: torch.Tensor, num_draws: int = 20000) -> float:
    """The real Sampler, end to end, on num_draws identical unseeded rows: each row is one draw."""
    torch.manual_seed(0)
    md = metadata(PARAMS, num_draws)
    tokens = Sampler()(LOGITS.expand(num_draws, -1).contiguous(), md).sampled_token_ids
    freq = torch.bincount(tokens, minlength=len(WORDS)).double() / num_draws
    err = (freq - final_probs.double()).abs().max().item()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = torch.arange(len(WORDS))
    ax.bar(x - 0.2, final_probs.tolist(), width=0.4, label="distribution after step 6")
    ax.bar(x + 0.2, freq.tolist(), width=0.4, label=f"Sampler: {num_draws} draws (exponential race)")
    ax.set_xticks(x.tolist(), WORDS)
    ax.set_ylabel("probability / frequency")
    ax.set_title(f"Step 7, sampling: argmax(p / q), q ~ Exp(1); max |freq - p| = {err:.3f}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(IMG / "m1_sampler_draws.png", dpi=110)
    plt.close(fig)
    return err


def plot_temperature() -> None:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    temps = [0.3, 0.7, 1.0, 1.5, 3.0]
    width = 0.8 / len(temps)
    x = torch.arange(len(WORDS))
    for j, t in enumerate(temps):
        probs = apply_temperature(LOGITS.unsqueeze(0), torch.tensor([t])).softmax(-1)[0]
        ax.bar(x + (j - len(temps) / 2 + 0.5) * width, probs.tolist(), width=width, label=f"T = {t}")
    ax.set_xticks(x.tolist(), WORDS)
    ax.set_ylabel("probability")
    ax.set_title("softmax(logits / T): T < 1 sharpens, T > 1 flattens (T -> 0: argmax)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(IMG / "m1_temperature.png", dpi=110)
    plt.close(fig)


def plot_top_k_vs_top_p(k: int = 5, p: float = 0.8) -> None:
    """Top-k keeps k tokens whatever the shape; top-p keeps few when peaked and many when flat."""
    vocab = 20
    names = [f"t{i}" for i in range(vocab)]
    peaked = torch.linspace(6.0, -3.0, vocab)
    flat = torch.linspace(1.0, -0.5, vocab)
    fig, axes = plt.subplots(2, 2, figsize=(11, 5.5), sharey="row")
    for row, (shape, logits) in enumerate([("peaked", peaked), ("flat", flat)]):
        for col, (name, ks, ps) in enumerate(
            [(f"top_k = {k}", torch.tensor([k]), None), (f"top_p = {p}", None, torch.tensor([p]))]
        ):
            kept = apply_top_k_top_p(logits.unsqueeze(0), ks, ps)[0] > -float("inf")
            probs = logits.softmax(-1)
            ax = axes[row, col]
            ax.bar(names, probs.tolist(), color=["tab:blue" if c else "lightgrey" for c in kept.tolist()])
            mass = probs[kept].sum().item()
            ax.set_title(f"{shape} distribution, {name}: {int(kept.sum())} kept, mass {mass:.2f}", fontsize=9)
            ax.tick_params(axis="x", labelsize=6, rotation=90)
    fig.tight_layout()
    fig.savefig(IMG / "m1_top_k_vs_top_p.png", dpi=110)
    plt.close(fig)


def measure_recompute_cost(prompt_len: int = 8, max_tokens: int = 120) -> list[int]:
    """Tokens m1's ModelRunner forwards at each engine step, recorded by wrapping execute_model."""
    llm = LLM(toy_checkpoint("qwen3"))
    runner = llm.llm_engine.model_runner
    forwarded: list[int] = []
    real_execute = runner.execute_model

    def counting_execute(scheduler_output):
        forwarded.append(sum(scheduler_output.num_scheduled_tokens))
        return real_execute(scheduler_output)

    runner.execute_model = counting_execute  # an instance attribute of this script's own engine
    prompt = list(range(10, 10 + prompt_len))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == max_tokens == len(forwarded)
    return forwarded


def plot_cost(prompt_len: int = 8, max_tokens: int = 120) -> None:
    m1 = measure_recompute_cost(prompt_len, max_tokens)
    steps = list(range(1, len(m1) + 1))
    cached = [prompt_len] + [1] * (len(m1) - 1)  # m2: the prompt once, then one token per step
    cum_m1 = torch.tensor(m1).cumsum(0).tolist()
    cum_cached = torch.tensor(cached).cumsum(0).tolist()
    attn_m1 = torch.tensor([n * n for n in m1], dtype=torch.float64).cumsum(0).tolist()
    attn_cached = torch.tensor(
        [prompt_len * prompt_len] + [prompt_len + t for t in range(1, len(m1))], dtype=torch.float64
    ).cumsum(0)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].plot(steps, cum_m1, label="m1 (measured): recompute all P + t - 1 tokens")
    axes[0].plot(steps, cum_cached, label="with a KV cache (m2): P, then 1 per step")
    axes[0].set_xlabel("output tokens generated (T)")
    axes[0].set_ylabel("token-forwards, cumulative")
    axes[0].set_title("MLP / projection work: O(T (P + T)) vs O(P + T)", fontsize=10)
    axes[0].legend(fontsize=8)
    axes[1].plot(steps, attn_m1, label="m1: sum of (P + t - 1)^2")
    axes[1].plot(steps, attn_cached.tolist(), label="KV cache: P^2, then P + t per step")
    axes[1].set_xlabel("output tokens generated (T)")
    axes[1].set_ylabel("query-key pairs, cumulative")
    axes[1].set_title("attention work: O(T (P + T)^2) vs O((P + T)^2)", fontsize=10)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"One sequence, prompt P = {prompt_len} tokens, on the toy Qwen3 checkpoint", fontsize=10)
    fig.tight_layout()
    fig.savefig(IMG / "m1_recompute_cost.png", dpi=110)
    plt.close(fig)


def main() -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    final_probs = plot_sampler_steps()
    err = plot_draws(final_probs)
    assert err < 0.02, f"the Sampler's draws do not match the plotted distribution (max error {err})"
    plot_temperature()
    plot_top_k_vs_top_p()
    plot_cost()
    for path in sorted(IMG.glob("m1_*.png")):
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
