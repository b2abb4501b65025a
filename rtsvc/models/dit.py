"""The RIFT-SVC V2 Diffusion Transformer (the velocity network of the rectified flow).

Read top to bottom: config, rotary embedding, attention, MLP, adaptive layer norms, one DiT
block, the time / condition / input embeddings, then the whole `DiT`. Parameter names match the
upstream V2 code (the gated ContentVec/Whisper variant), so an official checkpoint loads with
`strict=True` once the Lightning prefix `model.transformer.` is removed (see `rtsvc.models.loading`).

Shapes: x [b, n, 128] noisy normalised mel, spk [b] long, f0 / rms [b, n], cvec [b, n, 768],
whisper [b, n, 1280], time [b] (or a scalar) in [0, 1]; returns the velocity [b, n, 128].
Everything is tensor-only (no Python branches on tensor values), so it exports to ONNX with a
dynamic number of frames.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rtsvc.models.speakers import embed_speaker

LN_EPS = 1e-6
TIME_FREQ_DIM = 256  # sinusoidal features of t before the time MLP
TIME_SCALE = 1000.0
F0_SCALE = 1200.0  # f0 in Hz is divided by this before its linear embedding
ROPE_BASE = 10000.0
EMBED_MLP_MULT = 2  # the MLPs inside the condition and input embeddings
CONV_KERNEL = 7  # depthwise conv at the start of every MLP


@dataclass
class DiTConfig:
    dim: int
    depth: int
    head_dim: int = 64
    ff_mult: int = 4
    num_speaker: int = 1
    dropout: float = 0.1
    n_mel: int = 128
    cvec_dim: int = 768
    whisper_dim: int = 1280


# --- rotary position embedding (x-transformers semantics) -----------------------------------

class RotaryEmbedding(nn.Module):
    """Interleaved rotary frequencies for `dim` channels; `inv_freq` is a saved buffer upstream."""

    def __init__(self, dim: int):
        super().__init__()
        inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)  # persistent: official checkpoints carry it

    def forward(self, seq_len: int) -> torch.Tensor:
        # float32 even when the model runs in half precision: positions times frequencies
        # lose whole radians in fp16 (upstream disables autocast here for the same reason)
        t = torch.arange(seq_len, device=self.inv_freq.device).float()
        freqs = t[:, None] * self.inv_freq.float()[None, :]  # [n, dim/2]
        return torch.stack((freqs, freqs), dim=-1).flatten(-2)  # [n, dim]: f0 f0 f1 f1 ...


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): rotation within adjacent pairs."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate the first `freqs.shape[-1]` channels of x [b, n, d]; the rest pass through.

    Upstream applies a head_dim-wide rotary to q and k *before* splitting heads, so only the
    first head is position-rotated. Kept as is: the trained weights depend on it.
    """
    rot = freqs.shape[-1]
    head, tail = x[..., :rot].float(), x[..., rot:]
    head = head * freqs.cos() + rotate_pairs(head) * freqs.sin()
    return torch.cat((head.to(x.dtype), tail), dim=-1)


# --- building blocks --------------------------------------------------------------------------

class Attention(nn.Module):
    """Self-attention with per-head LayerNorm on q/k and the upstream 1/dim score scale."""

    def __init__(self, dim: int, head_dim: int, dropout: float):
        super().__init__()
        assert dim % head_dim == 0, "dim must be a multiple of head_dim"
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.scale = 1.0 / dim  # not 1/sqrt(head_dim): q and k are layer-normed per head
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.norm_q = nn.LayerNorm(head_dim, elementwise_affine=False, eps=LN_EPS)
        self.norm_k = nn.LayerNorm(head_dim, elementwise_affine=False, eps=LN_EPS)
        self.attn_out = nn.Linear(dim, dim)
        self.attn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None = None):
        b, n, _ = x.shape
        q = apply_rotary(self.q_proj(x), rope)
        k = apply_rotary(self.k_proj(x), rope)
        v = self.v_proj(x)
        q, k, v = (t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = self.norm_q(q), self.norm_k(k)
        attn_mask = None if mask is None else mask[:, None, None, :]  # keys only
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        out = self.attn_dropout(self.attn_out(out.transpose(1, 2).reshape(b, n, -1)))
        if mask is not None:
            out = out.masked_fill(~mask[..., None], 0.0)
        return out


class MLP(nn.Module):
    """Depthwise conv over time, LayerNorm, Linear up, ReLU^2, dropout, Linear down."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: float = 4, dropout: float = 0.0,
                 kernel_size: int = CONV_KERNEL):
        super().__init__()
        inner = int(dim * mult)
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)
        self.dropout = nn.Dropout(dropout)
        self.mlp_proj = nn.Linear(dim, inner)
        self.mlp_out = nn.Linear(inner, dim_out or dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:  # padded frames read as the zeros a lone item's conv pads with
            x = x.masked_fill(~mask[..., None], 0.0)
        x = self.dwconv(x.transpose(1, 2)).transpose(1, 2)
        x = F.relu(self.mlp_proj(self.norm(x))).square()
        return self.mlp_out(self.dropout(x))


class AdaLayerNormZero(nn.Module):
    """LayerNorm modulated by the time+speaker embedding; also returns the MLP's modulation."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)

    def forward(self, x: torch.Tensor, emb: torch.Tensor):
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.proj(F.silu(emb)).chunk(6, dim=1)
        x = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        return x, gate, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroFinal(nn.Module):
    """Final modulation: scale first, then shift (upstream order)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.proj(F.silu(emb)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, dim: int, head_dim: int, ff_mult: float, dropout: float,
                 kernel_size: int = CONV_KERNEL):
        super().__init__()
        self.attn_norm = AdaLayerNormZero(dim)
        self.attn = Attention(dim, head_dim, dropout)
        self.mlp_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)
        self.mlp = MLP(dim, mult=ff_mult, dropout=dropout, kernel_size=kernel_size)

    def forward(self, x, t, rope, mask=None, conv_mask=None):
        """`mask`: attention keys (upstream's); `conv_mask`: also zero padded frames before the MLP's
        conv (each item as if alone: padded slices batched offline)."""
        norm, gate, shift_mlp, scale_mlp, gate_mlp = self.attn_norm(x, t)
        x = x + gate[:, None] * self.attn(norm, rope, mask)
        norm = self.mlp_norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp[:, None] * self.mlp(norm, conv_mask)


# --- embeddings -------------------------------------------------------------------------------

def sinusoidal_time(t: torch.Tensor, dim: int = TIME_FREQ_DIM) -> torch.Tensor:
    """[b] -> [b, dim]: sin then cos of 1000 t at frequencies exp(-ln(1e4) i / (dim/2 - 1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    args = TIME_SCALE * t.float()[:, None] * freqs[None, :]
    return torch.cat((args.sin(), args.cos()), dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.time_emb = nn.Linear(TIME_FREQ_DIM, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.time_emb(sinusoidal_time(t).to(self.time_emb.weight.dtype))))


class CondEmbedding(nn.Module):
    """f0, rms, ContentVec and Whisper -> one [b, n, dim] condition; a learnt gate mixes the two
    content features per frame and channel."""

    def __init__(self, cvec_dim: int, whisper_dim: int, dim: int):
        super().__init__()
        self.f0_embed = nn.Linear(1, dim)
        self.rms_embed = nn.Linear(1, dim)
        self.cvec_embed = nn.Linear(cvec_dim, dim)
        self.whisper_embed = nn.Linear(whisper_dim, dim)
        self.mlp = MLP(dim, dim, mult=EMBED_MLP_MULT)
        self.ln_cvec = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)
        self.ln_whisper = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)
        self.ln = nn.LayerNorm(dim, elementwise_affine=True, eps=LN_EPS)
        self.gate_linear = nn.Linear(2 * dim, dim)

    def forward(self, f0, rms, cvec, whisper, mask=None):
        cvec_e = self.ln_cvec(self.cvec_embed(cvec))
        whisper_e = self.ln_whisper(self.whisper_embed(whisper))
        gate = torch.sigmoid(self.gate_linear(torch.cat((cvec_e, whisper_e), dim=-1)))
        cond = (self.f0_embed(f0[..., None] / F0_SCALE) + self.rms_embed(rms[..., None])
                + gate * cvec_e + (1 - gate) * whisper_e)
        return self.ln(self.mlp(cond, mask) + cond)


class InputEmbedding(nn.Module):
    """Noisy mel + condition -> the transformer's input, as the V2 release (ec67126): projection,
    LayerNorm, then the MLP residual. (911dd19, after the V2 checkpoints were published, moved the
    LayerNorm after the residual; the published weights were trained with this order.)"""

    def __init__(self, n_mel: int, dim: int):
        super().__init__()
        self.mel_embed = nn.Linear(n_mel, dim)
        self.proj = nn.Linear(2 * dim, dim)
        self.mlp = MLP(dim, dim, mult=EMBED_MLP_MULT)
        self.ln = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.ln(self.proj(torch.cat((self.mel_embed(x), cond), dim=-1)))
        return self.mlp(x, mask) + x


# --- the model --------------------------------------------------------------------------------

class DiT(nn.Module):
    family = "v2"

    def __init__(self, config: DiTConfig):
        super().__init__()
        c = self.config = config
        self.dim = c.dim
        self.spk_embed = nn.Embedding(c.num_speaker, c.dim)
        self.null_whisper_embed = nn.Embedding(1, c.whisper_dim)
        self.time_embed = TimestepEmbedding(c.dim)
        self.cond_embed = CondEmbedding(c.cvec_dim, c.whisper_dim, c.dim)
        self.input_embed = InputEmbedding(c.n_mel, c.dim)
        self.rotary_embed = RotaryEmbedding(c.head_dim)
        self.transformer_blocks = nn.ModuleList(
            DiTBlock(c.dim, c.head_dim, c.ff_mult, c.dropout) for _ in range(c.depth))
        self.norm_out = AdaLayerNormZeroFinal(c.dim)
        self.output = nn.Linear(c.dim, c.n_mel)
        init_spectral(self)

    def forward(self, x, spk, f0, rms, cvec, whisper, time, drop_whisper, mask=None, items_alone=False):
        """Velocity [b, n, n_mel]. `drop_whisper`: a bool for the whole batch (upstream) or a bool
        tensor [b], so the null and full CFG branches can share one batch. `items_alone`: the convs
        read zeros past each item's `mask`ed frames too (upstream's mask reaches attention only)."""
        b, n = x.shape[0], x.shape[1]
        if time.ndim == 0:
            time = time.expand(b)
        t = self.time_embed(time) + embed_speaker(self.spk_embed, spk)  # an index or blend weights
        if isinstance(drop_whisper, bool):
            drop_whisper = torch.full((b,), drop_whisper, dtype=torch.bool, device=x.device)
        null = self.null_whisper_embed.weight.to(whisper.dtype)[None]  # [1, 1, whisper_dim]
        whisper = torch.where(drop_whisper.bool()[:, None, None], null, whisper)

        conv_mask = mask if items_alone else None
        x = self.input_embed(x, self.cond_embed(f0, rms, cvec, whisper, conv_mask), conv_mask)
        rope = self.rotary_embed(n)
        for block in self.transformer_blocks:
            x = block(x, t, rope, mask, conv_mask)
        return self.output(self.norm_out(x, t))


def init_spectral(model: nn.Module, init_std: float = 1.0) -> None:
    """Upstream initialisation (spectral parameterisation, arXiv 2310.17813): normal weights with
    std = init_std / sqrt(fan_in) * min(1, sqrt(fan_out / fan_in)), zero biases, embeddings with
    std init_std / sqrt(dim); the adaptive-norm projections, the embedding MLPs' outputs and the
    final layer start at zero so every block starts as the identity."""
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv1d):
            fan_out = m.weight.shape[0]
            fan_in = m.weight[0].numel()  # in_features, or in_channels / groups * kernel
            std = init_std / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=init_std / math.sqrt(model.dim))
    zeroed = [model.norm_out.proj, model.output] + [blk.attn_norm.proj for blk in model.transformer_blocks]
    for m in zeroed:
        nn.init.zeros_(m.weight)
        nn.init.zeros_(m.bias)
    for embed in (model.cond_embed, model.input_embed):  # V2 only (V3's embeddings have no MLP)
        if hasattr(embed, "mlp"):
            nn.init.zeros_(embed.mlp.mlp_out.weight)  # upstream zeroes only the weight here
