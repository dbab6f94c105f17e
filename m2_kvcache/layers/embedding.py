"""The token embedding and the LM head (which may share its weight with the embedding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from m2_kvcache.layers.linear import default_weight_loader


class VocabEmbedding(nn.Module):
    """token id -> row of weight (num_embeddings, embedding_dim). m5 splits the rows by vocabulary."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)  # (num_tokens,) -> (num_tokens, embedding_dim)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        default_weight_loader(param, loaded_weight, shard_id)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LMHead(VocabEmbedding):
    """hidden -> logits over the whole (padded) vocabulary: logits = hidden @ weight^T.

    With tied embeddings (`tie_weights`) the head *is* the embedding matrix: one parameter, two uses,
    and the checkpoint stores it once as model.embed_tokens.weight."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False) -> None:
        super().__init__(num_embeddings, embedding_dim)
        if bias:
            raise ValueError("an LM head with a bias is not supported")

    def tie_weights(self, embedding: VocabEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, hidden_states: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(num_seqs, hidden) -> (num_seqs, vocab); written into `out` when given (m4's graphs pass
        their shared logits buffer, which saves a copy of every logit)."""
        if out is None:
            return F.linear(hidden_states, self.weight)
        return torch.mm(hidden_states, self.weight.t(), out=out)
