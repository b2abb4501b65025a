"""The RIFT-SVC V3 Diffusion Transformer (upstream c03fa59, released 2025-03-06).

Differences from V2 (`rtsvc.models.dit`), everything else (blocks, attention, rotary, adaptive norms)
shared: no Whisper; the condition is f0 + rms + LN(ContentVec) -> Linear `out` -> affine LN (no
gate, no MLP); the input embedding is projection -> LN with no MLP; a learnt null speaker
`null_spk_embed` replaces the speaker for speaker guidance (`drop_speaker`); the MLPs' depthwise conv
has kernel 31; the time embedding is called `tembed`; `skip_layers` bypasses blocks (skip-layer
guidance). LoRA fine-tunes carry adapters on every block's `attn.k_proj` and `attn.v_proj`
(`rtsvc.models.lora`).

Shapes: x [b, n, 128], spk [b] long, f0 / rms [b, n], cvec [b, n, 768], time [b] or scalar,
drop_speaker bool or bool [b], mask [b, n] (True = valid) or None; returns [b, n, 128].
"""

from dataclasses import dataclass

import torch
from torch import nn

from rtsvc.models.dit import (
    F0_SCALE,
    LN_EPS,
    AdaLayerNormZeroFinal,
    DiTBlock,
    RotaryEmbedding,
    TimestepEmbedding,
    init_spectral,
)
from rtsvc.models.lora import LoRALinear
from rtsvc.models.speakers import embed_speaker

V3_KERNEL = 31


@dataclass
class DiTV3Config:
    dim: int
    depth: int
    head_dim: int = 64
    ff_mult: int = 4
    num_speaker: int = 1
    dropout: float = 0.0
    n_mel: int = 128
    cvec_dim: int = 768
    kernel_size: int = V3_KERNEL
    lora_rank: int | None = None  # adapters on attn.k_proj / attn.v_proj when set
    lora_alpha: float | None = None


class CondEmbeddingV3(nn.Module):
    def __init__(self, cvec_dim: int, dim: int):
        super().__init__()
        self.f0_embed = nn.Linear(1, dim)
        self.rms_embed = nn.Linear(1, dim)
        self.cvec_embed = nn.Linear(cvec_dim, dim)
        self.out = nn.Linear(dim, dim)
        self.ln_cvec = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)
        self.ln = nn.LayerNorm(dim, elementwise_affine=True, eps=LN_EPS)

    def forward(self, f0: torch.Tensor, rms: torch.Tensor, cvec: torch.Tensor) -> torch.Tensor:
        cond = (self.f0_embed(f0[..., None] / F0_SCALE) + self.rms_embed(rms[..., None])
                + self.ln_cvec(self.cvec_embed(cvec)))
        return self.ln(self.out(cond))


class InputEmbeddingV3(nn.Module):
    def __init__(self, n_mel: int, dim: int):
        super().__init__()
        self.mel_embed = nn.Linear(n_mel, dim)
        self.proj = nn.Linear(2 * dim, dim)
        self.ln = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.ln(self.proj(torch.cat((self.mel_embed(x), cond), dim=-1)))


class DiTV3(nn.Module):
    family = "v3"

    def __init__(self, config: DiTV3Config):
        super().__init__()
        c = self.config = config
        self.dim = c.dim
        self.spk_embed = nn.Embedding(c.num_speaker, c.dim)
        self.null_spk_embed = nn.Embedding(1, c.dim)
        self.tembed = TimestepEmbedding(c.dim)
        self.cond_embed = CondEmbeddingV3(c.cvec_dim, c.dim)
        self.input_embed = InputEmbeddingV3(c.n_mel, c.dim)
        self.rotary_embed = RotaryEmbedding(c.head_dim)
        self.transformer_blocks = nn.ModuleList(
            DiTBlock(c.dim, c.head_dim, c.ff_mult, c.dropout, c.kernel_size) for _ in range(c.depth))
        self.norm_out = AdaLayerNormZeroFinal(c.dim)
        self.output = nn.Linear(c.dim, c.n_mel)
        init_spectral(self)
        if c.lora_rank is not None:
            self.add_lora(c.lora_rank, c.lora_alpha if c.lora_alpha is not None else c.lora_rank)

    def add_lora(self, rank: int, alpha: float) -> None:
        """Wrap every block's attn.k_proj and attn.v_proj in a LoRA adapter (upstream `apply_lora`,
        without its freezing: trainers choose what trains)."""
        for block in self.transformer_blocks:
            block.attn.k_proj = LoRALinear(block.attn.k_proj, rank, alpha)
            block.attn.v_proj = LoRALinear(block.attn.v_proj, rank, alpha)
        self.config.lora_rank, self.config.lora_alpha = int(rank), float(alpha)

    def merge_lora(self) -> None:
        """Fold the adapters into plain Linears (W += alpha / sqrt(rank) * B A^T); same outputs."""
        for block in self.transformer_blocks:
            for name in ("k_proj", "v_proj"):
                layer = getattr(block.attn, name)
                if isinstance(layer, LoRALinear):
                    setattr(block.attn, name, layer.merged())
        self.config.lora_rank = self.config.lora_alpha = None

    def adaln_and_time_parameters(self) -> list[nn.Parameter]:
        """What upstream's `freeze_adaln_and_tembed` freezes: tembed, norm_out, every attn_norm."""
        modules = [self.tembed, self.norm_out, *(b.attn_norm for b in self.transformer_blocks)]
        return [p for m in modules for p in m.parameters()]

    def forward(self, x: torch.Tensor, spk: torch.Tensor, f0: torch.Tensor, rms: torch.Tensor,
                cvec: torch.Tensor, time: torch.Tensor, drop_speaker: bool | torch.Tensor = False,
                mask: torch.Tensor | None = None, skip_layers: int | list[int] | None = None,
                items_alone: bool = False) -> torch.Tensor:
        """`items_alone`: as V2's `DiT.forward` (the convs read zeros past each item's frames)."""
        b, n = x.shape[0], x.shape[1]
        if time.ndim == 0:
            time = time.expand(b)
        null = self.null_spk_embed.weight[0][None]
        if isinstance(drop_speaker, bool):  # a Python branch, no bool tensor: keeps ONNX tracing simple
            speaker = null.expand(b, -1) if drop_speaker else embed_speaker(self.spk_embed, spk)
        else:
            speaker = torch.where(drop_speaker.bool()[:, None], null, embed_speaker(self.spk_embed, spk))
        t = self.tembed(time) + speaker
        x = self.input_embed(x, self.cond_embed(f0, rms, cvec))
        rope = self.rotary_embed(n)
        skipped = {skip_layers} if isinstance(skip_layers, int) else set(skip_layers or ())
        for i, block in enumerate(self.transformer_blocks):
            if i not in skipped:
                x = block(x, t, rope, mask, mask if items_alone else None)
        return self.output(self.norm_out(x, t))
