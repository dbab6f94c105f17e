"""The vocabulary split over ranks: the token embedding and the LM head.

Rank r holds rows [start_r, end_r) of the (vocab, hidden) matrix, ceil(vocab / tp) rows each (the
last rank's tail is zero padding when the vocabulary does not divide).

- Embedding: a token id belongs to exactly one rank. Every rank looks up the ids in its range and
  writes zeros for the others; the all-reduce (a sum) then puts each token's row together.
- LM head: logits = hidden @ W^T splits by vocabulary too: rank r computes the logits of its own
  token ids, (num_seqs, vocab / tp), and the driver gathers them in rank order, so its columns
  line up with the token ids. Only the driver samples, so only it receives the logits.

The two use the same ranges, so a tied LM head is simply the embedding's shard.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from m2_kvcache.layers.embedding import VocabEmbedding
from m2_kvcache.layers.linear import check_shape
from m5_tp.parallel_state import TensorParallelGroup
from m5_tp.partition import vocab_range


class VocabParallelEmbedding(VocabEmbedding):
    """token id -> its row: a masked lookup in this rank's shard, then an all-reduce."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group: TensorParallelGroup) -> None:
        self.tp_group = tp_group
        self.vocab_start_index, self.vocab_end_index, self.num_embeddings_per_partition = vocab_range(
            num_embeddings, tp_group.rank, tp_group.world_size
        )
        super().__init__(self.num_embeddings_per_partition, embedding_dim)
        self.num_embeddings = num_embeddings  # the real vocabulary, unpadded

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"this parameter is not fused, but shard {shard_id!r} was given")
        check_shape(torch.empty(self.num_embeddings, self.embedding_dim, device="meta"), loaded_weight)
        n = self.vocab_end_index - self.vocab_start_index
        param.data[:n].copy_(loaded_weight[self.vocab_start_index : self.vocab_end_index])
        param.data[n:].zero_()  # padding rows: never looked up; their logits are cut off

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_group.world_size == 1:
            return F.embedding(input_ids, self.weight)
        # (num_tokens,): which ids are this rank's; the others look up row 0 and are zeroed
        mine = (input_ids >= self.vocab_start_index) & (input_ids < self.vocab_end_index)
        local_ids = torch.where(mine, input_ids - self.vocab_start_index, 0)
        rows = F.embedding(local_ids, self.weight).masked_fill_(~mine.unsqueeze(-1), 0)
        return self.tp_group.all_reduce(rows)  # (num_tokens, embedding_dim): exactly one rank's row each

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start_index}, "
            f"{self.vocab_end_index}) of {self.num_embeddings_per_partition} per rank"
        )


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the whole vocabulary on the driver (rank 0). The other ranks get an
    empty (num_seqs, 0) tensor: they only contribute their slice."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, bias: bool = False, *, tp_group: TensorParallelGroup
    ) -> None:
        if bias:
            raise ValueError("an LM head with a bias is not supported")
        super().__init__(num_embeddings, embedding_dim, tp_group=tp_group)

    def tie_weights(self, embedding: VocabEmbedding) -> None:
        same = isinstance(embedding, VocabParallelEmbedding) and (
            embedding.tp_group.world_size,
            embedding.vocab_start_index,
            embedding.num_embeddings_per_partition,
        ) == (self.tp_group.world_size, self.vocab_start_index, self.num_embeddings_per_partition)
        if not same:
            raise ValueError(
                "a tied LM head needs a VocabParallelEmbedding split over the same vocabulary ranges"
            )
        self.weight = embedding.weight

    def forward(self, hidden_states: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """As m2's LMHead (`out`: the driver's logits are written there; other ranks leave it)."""
        if out is not None and self.tp_group.world_size == 1 and self.weight.shape[0] == self.num_embeddings:
            return torch.mm(hidden_states, self.weight.t(), out=out)  # nothing to gather or cut off
        local = F.linear(hidden_states, self.weight)  # (num_seqs, vocab_per_rank): this rank's token ids
        logits = self.tp_group.gather(local, dst=0, dim=-1)  # (num_seqs, vocab_per_rank * tp) on rank 0
        if logits is None:
            return local[:, :0]
        logits = logits[:, : self.num_embeddings]  # drop the padding columns
        return logits if out is None else out.copy_(logits)
