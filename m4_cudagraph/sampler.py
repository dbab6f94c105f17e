"""m4's sampler: m1's, with the commonest batch sampled by one fused kernel on a GPU.

A throughput run's batch sets only temperatures (no top-k/top-p/min-p, penalties, seeds, logprobs or
min_tokens): m1's `SamplingMetadata` marks it by leaving every other field empty. For such a batch
m1's sampler makes about eight passes over a (num_seqs, vocab_size) float32 matrix, 155 MB each at
256 rows of Qwen3's 151,936-token vocabulary; `ops/sample.py` reads the logits once. Every other
batch goes through m1's sampler unchanged. Seeded rows always do: their draws must come from their
own torch generators, which the fused kernel does not use.
"""

from __future__ import annotations

import torch

from m1_sampling.sampler import Sampler, SamplerOutput
from m1_sampling.sampling_metadata import SamplingMetadata
from m4_cudagraph.ops import sample_temperature


def temperature_only(metadata: SamplingMetadata) -> bool:
    """Whether the batch's distribution is set by its temperatures alone, with nothing to report
    but the chosen token's logprob (what `SamplingMetadata._from_temperatures` builds)."""
    md = metadata
    return (
        md.no_top_k and md.no_top_p and md.no_min_p and md.no_penalties
        and not md.min_tokens_stop_ids and not md.generators and md.max_num_logprobs is None
    )  # fmt: skip


class FusedSampler(Sampler):
    def forward(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        # An all-greedy batch is already cheap in m1 (log-softmax, gather, argmax).
        if metadata.all_greedy or not temperature_only(metadata):
            return super().forward(logits, metadata)
        # One seed per step from torch's global CPU generator: reproducible, and no GPU read-back.
        seed = int(torch.randint(2**31 - 1, ()))
        ids, logprobs = sample_temperature(logits, metadata.temperatures, seed)
        return SamplerOutput(ids, logprobs, ranks=None, topk_token_ids=None, topk_logprobs=None)

    @staticmethod
    def warm_up(vocab_size: int, dtypes: list[torch.dtype], device: torch.device) -> None:
        """Compile the kernels for every logits dtype the runner hands over (the model's from graph
        replays, float32 from eager steps) at start-up, not inside the first steps that meet one: on
        a fresh machine each compile took seconds of the first run."""
        for dtype in dtypes:
            sample_temperature(
                torch.zeros(1, vocab_size, dtype=dtype, device=device), torch.ones(1, device=device), 0
            )


def sampler_for(device: torch.device) -> Sampler:
    """The fused sampler on CUDA; m1's elsewhere (a CPU runs Triton only in its slow interpreter)."""
    return FusedSampler() if device.type == "cuda" else Sampler()
