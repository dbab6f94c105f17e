"""m1's model runner: the Hugging Face model, recomputing every sequence from its first token.

No KV cache: step t of a sequence of length n runs the model over all n tokens, so generating T
tokens costs O(T * n) token-forwards and O(T * n^2) attention work. m2 keeps K and V instead.
"""

from __future__ import annotations

import torch

from m0_config.config import EngineConfig
from m0_config.loader import load_hf_model
from m1_sampling.scheduler import SchedulerOutput


def left_pad(token_lists: list[list[int]], pad_id: int, device: torch.device):
    """Left-pad to one length. Returns input_ids, attention_mask and position_ids, each
    (num_seqs, max_len); positions count real tokens only, so padding never shifts RoPE."""
    max_len = max(len(t) for t in token_lists)
    input_ids = torch.full((len(token_lists), max_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), max_len), dtype=torch.long)
    for i, tokens in enumerate(token_lists):
        input_ids[i, max_len - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
        mask[i, max_len - len(tokens) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), mask.to(device), positions.to(device)


class ModelRunner:
    """Runs the HF model on a static batch and returns the last position's logits per sequence."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = config.model_config.device
        self.model = load_hf_model(config.model_config)
        self.pad_token_id = 0  # any id: padded positions are masked out

    @property
    def vocab_size(self) -> int:
        return self.config.model_config.vocab_size

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> torch.Tensor:
        """Logits (num_seqs, vocab_size) in float32 at each sequence's last token."""
        tokens = [seq.get_token_ids() for seq in scheduler_output.seqs]
        input_ids, mask, positions = left_pad(tokens, self.pad_token_id, self.device)
        # Left padding puts every sequence's last token in the last column; only it needs logits.
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float()
