"""LoRA adapters on a Linear layer, in RIFT-SVC V3's layout (`<name>.linear.weight|bias`, `<name>.A`
[in, rank], `<name>.B` [out, rank]).

    y = W x + b + (x A) B^T * alpha / sqrt(rank)

`merge` folds the adapter into W with that same scale (upstream's `merge_lora` leaves the scale out,
which is only right when alpha = sqrt(rank)).
"""

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.linear = linear
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scale = self.alpha / math.sqrt(self.rank)
        # upstream init: A small normal, B zero, so a fresh adapter changes nothing
        std = math.sqrt(self.rank) / linear.in_features
        self.A = nn.Parameter(torch.randn(linear.in_features, self.rank) * std)
        self.B = nn.Parameter(torch.zeros(linear.out_features, self.rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + ((x @ self.A) @ self.B.T) * self.scale

    def merged(self) -> nn.Linear:
        """A plain Linear computing the same function: W + scale * B A^T."""
        out = nn.Linear(self.linear.in_features, self.linear.out_features, bias=self.linear.bias is not None)
        with torch.no_grad():
            out.weight.copy_(self.linear.weight + self.scale * (self.B @ self.A.T))
            if self.linear.bias is not None:
                out.bias.copy_(self.linear.bias)
        return out.to(self.linear.weight.device)


def lora_rank_of(state: dict[str, torch.Tensor]) -> int | None:
    """The adapters' rank in a DiT state dict (None when it carries no adapters)."""
    ranks = {v.shape[1] for k, v in state.items() if k.endswith((".k_proj.A", ".v_proj.A"))}
    if len(ranks) > 1:
        raise ValueError(f"LoRA adapters of different ranks: {sorted(ranks)}")
    return ranks.pop() if ranks else None
