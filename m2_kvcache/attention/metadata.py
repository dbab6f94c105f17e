"""What one forward step's attention needs to know about the batch: built once per step by the model
runner and passed explicitly down to every layer (no global context)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from m1_sampling.sampling_metadata import host_to_device, to_device


def varlen_layout(
    query_lens: list[int], seq_lens: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cu_seqlens_q (num_seqs+1,), token_seq_ids (num_tokens,), positions (num_tokens,)), int64 on
    the CPU, of a flattened batch whose sequence b has query_lens[b] new tokens ending at seq_lens[b]."""
    q_lens = torch.tensor(query_lens, dtype=torch.int64)
    cu = torch.zeros(len(query_lens) + 1, dtype=torch.int64)
    cu[1:] = q_lens.cumsum(0)
    token_seq_ids = torch.repeat_interleave(torch.arange(len(query_lens)), q_lens)
    first_pos = torch.tensor(seq_lens, dtype=torch.int64) - q_lens  # cached tokens before this step
    positions = first_pos[token_seq_ids] + torch.arange(int(cu[-1])) - cu[token_seq_ids]
    return cu, token_seq_ids, positions


@dataclass
class AttentionMetadata:
    """The layout of a flattened ("varlen") batch.

    All sequences' new tokens are concatenated into one (num_tokens, ...) tensor: sequence b owns rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1], which are its newest query_len tokens, at positions
    seq_lens[b] - query_len ... seq_lens[b] - 1. A prefill has query_len == seq_len, a decode step
    query_len == 1, a prompt chunk anything between; the same backend handles all three and mixes.
    Build it with `AttentionMetadata.build`, which derives the per-token fields.
    """

    cu_seqlens_q: torch.Tensor  # (num_seqs + 1,) int32: start row of each sequence's tokens, then num_tokens
    seq_lens: torch.Tensor  # (num_seqs,) int32: context length after this step (cached + new tokens)
    slot_ids: torch.Tensor  # (num_seqs,) int64: the KV-cache slot (cache row) each sequence owns
    max_seqlen_q: int  # longest query_len in the batch
    max_seqlen_k: int  # longest seq_len in the batch
    token_seq_ids: torch.Tensor  # (num_tokens,) int64: the batch index b of each token
    positions: torch.Tensor  # (num_tokens,) int64: each token's position in its sequence

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        seq_lens: Sequence[int],
        slot_ids: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> AttentionMetadata:
        """From per-sequence Python lists (num new tokens, total length, slot); slot_ids defaults to
        0..num_seqs-1. `positions` is exactly the positions tensor the model's forward takes."""
        query_lens, seq_lens = list(query_lens), list(seq_lens)
        slot_ids = list(range(len(seq_lens))) if slot_ids is None else list(slot_ids)
        if not (len(query_lens) == len(seq_lens) == len(slot_ids) > 0):
            raise ValueError("query_lens, seq_lens and slot_ids must be non-empty and of equal length")
        if any(not 1 <= q <= s for q, s in zip(query_lens, seq_lens)):
            raise ValueError(f"need 1 <= query_len <= seq_len, got {query_lens} and {seq_lens}")
        if len(set(slot_ids)) != len(slot_ids):
            raise ValueError(f"two sequences share a cache slot: {slot_ids}")
        cu, token_seq_ids, positions = varlen_layout(query_lens, seq_lens)
        return cls(
            cu_seqlens_q=to_device(cu.to(torch.int32), device),
            seq_lens=host_to_device(seq_lens, torch.int32, device),
            slot_ids=host_to_device(slot_ids, torch.int64, device),
            max_seqlen_q=max(query_lens),
            max_seqlen_k=max(seq_lens),
            token_seq_ids=to_device(token_seq_ids, device),
            positions=to_device(positions, device),
        )

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @property
    def query_lens(self) -> torch.Tensor:
        return self.cu_seqlens_q.diff()  # (num_seqs,)

    @property
    def last_token_indices(self) -> torch.Tensor:
        """Row of each sequence's last token: only these rows go through the LM head."""
        return self.cu_seqlens_q[1:].long() - 1  # (num_seqs,)
