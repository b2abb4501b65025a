"""The DiT's speaker input: an index into its speaker table, or weights over the table (a blend).

`spk` [b] long picks rows of `spk_embed`; `spk` [b, S] float mixes them: the embedding is
the weighted sum of the rows (S may be fewer than the table's rows: the rest weigh 0). One-hot weights give
exactly the indexed row (1.0 * row + 0.0 * the others), so a graph that takes weights reproduces
single speakers bit for bit.
"""

import torch
import torch.nn.functional as F
from torch import nn


def embed_speaker(table: nn.Embedding, spk: torch.Tensor) -> torch.Tensor:
    """[b, dim] speaker embeddings of an index [b] or of weights [b, S] over the table."""
    if not spk.is_floating_point():
        return table(spk)
    rows = table.weight.shape[0]
    if spk.shape[1] != rows:  # trace time: a constant (exported graphs take all rows)
        spk = F.pad(spk, (0, rows - spk.shape[1]))
    # a weighted sum, not a matmul: int8 export quantizes MatMul/Gemm, and the speaker should stay exact
    return (spk.to(table.weight.dtype)[:, :, None] * table.weight[None]).sum(dim=1)


def speaker_weights(spk: torch.Tensor, rows: int) -> torch.Tensor:
    """Weights [b, rows] of an index [b] (one-hot) or of weights [b, S <= rows] (zero-padded)."""
    if not spk.is_floating_point():
        return F.one_hot(spk.long(), rows).float()
    return F.pad(spk.float(), (0, rows - spk.shape[1]))
