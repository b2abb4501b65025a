"""rift_svc/modules.py (shared by V2 ec67126 and V3 c03fa59) and x_transformers' rotary embedding."""

import math

import torch
import torch.nn.functional as F
from torch import nn

# --- x_transformers.x_transformers: RotaryEmbedding / apply_rotary_pos_emb ----------------------

class RotaryEmbedding(nn.Module):
    def __init__(self, dim, base=10000):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)

    def forward_from_seq_len(self, seq_len):
        t = torch.arange(seq_len, device=self.inv_freq.device)
        freqs = torch.einsum("i,j->ij", t.type_as(self.inv_freq), self.inv_freq)
        freqs = torch.stack((freqs, freqs), dim=-1).reshape(seq_len, -1)  # '... d r -> ... (d r)'
        return freqs, 1.0


def rotate_half(x):
    x = x.reshape(*x.shape[:-1], -1, 2)
    x1, x2 = x.unbind(dim=-1)
    return torch.stack((-x2, x1), dim=-1).reshape(*x.shape[:-2], -1)


def apply_rotary_pos_emb(t, freqs, scale=1):
    rot_dim, seq_len, orig_dtype = freqs.shape[-1], t.shape[-2], t.dtype
    freqs = freqs[-seq_len:, :]
    t, t_unrotated = t[..., :rot_dim], t[..., rot_dim:]
    t = (t * freqs.cos() * scale) + (rotate_half(t) * freqs.sin() * scale)
    return torch.cat((t, t_unrotated), dim=-1).type(orig_dtype)


# --- rift_svc/modules.py ----------------------------------------------------------------------

class LoRALinear(nn.Module):  # V3 only
    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / math.sqrt(rank)
        self.A = nn.Parameter(torch.zeros(linear.in_features, rank))
        self.B = nn.Parameter(torch.zeros(linear.out_features, rank))
        nn.init.normal_(self.A, mean=0, std=math.sqrt(rank) / linear.in_features)
        nn.init.zeros_(self.B)

    def forward(self, x):
        return self.linear(x) + ((x @ self.A) @ self.B.T) * self.scale


class AdaLayerNormZero(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.silu = nn.SiLU()
        self.proj = nn.Linear(dim, dim * 6)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x, emb=None):
        emb = self.proj(self.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = torch.chunk(emb, 6, dim=1)
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZero_Final(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.silu = nn.SiLU()
        self.proj = nn.Linear(dim, dim * 2)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x, emb):
        scale, shift = torch.chunk(self.proj(self.silu(emb)), 2, dim=1)
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


class ConvMLP(nn.Module):  # V2 names it MLP with the kernel fixed at 7; V3 passes 31
    def __init__(self, dim, dim_out=None, mult=4, dropout=0.0, kernel_size=7):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim_out if dim_out is not None else dim
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.mlp_proj = nn.Linear(dim, inner_dim)
        self.mlp_out = nn.Linear(inner_dim, dim_out)

    def forward(self, x):
        x = self.dwconv(x.permute(0, 2, 1)).permute(0, 2, 1)
        x = F.relu(self.mlp_proj(self.norm(x))).square()
        return self.mlp_out(self.dropout(x))


class Attention(nn.Module):
    def __init__(self, dim, head_dim=64, dropout=0.0):
        super().__init__()
        self.num_heads = dim // head_dim
        self.scale = 1 / dim
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.norm_q = nn.LayerNorm(head_dim, elementwise_affine=False, eps=1e-6)
        self.norm_k = nn.LayerNorm(head_dim, elementwise_affine=False, eps=1e-6)
        self.attn_out = nn.Linear(dim, dim)
        self.attn_dropout = nn.Dropout(dropout)

    def forward(self, x, mask=None, rope=None):
        b = x.shape[0]
        query, key, value = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if rope is not None:
            freqs, xpos_scale = rope
            query = apply_rotary_pos_emb(query, freqs, 1.0)
            key = apply_rotary_pos_emb(key, freqs, 1.0)
        head_dim = key.shape[-1] // self.num_heads
        query, key, value = (t.view(b, -1, self.num_heads, head_dim).transpose(1, 2)
                             for t in (query, key, value))
        query, key = self.norm_q(query), self.norm_k(key)
        attn_mask = None
        if mask is not None:
            attn_mask = mask[:, None, None, :].expand(b, self.num_heads, query.shape[-2], key.shape[-2])
        x = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0,
                                           is_causal=False, scale=self.scale)
        x = x.transpose(1, 2).reshape(b, -1, self.num_heads * head_dim).to(query.dtype)
        x = self.attn_dropout(self.attn_out(x))
        if mask is not None:
            x = x.masked_fill(~mask[..., None], 0.0)
        return x


class DiTBlock(nn.Module):
    def __init__(self, dim, head_dim, ff_mult=4, dropout=0.0, kernel_size=31):
        super().__init__()
        self.attn_norm = AdaLayerNormZero(dim)
        self.attn = Attention(dim=dim, head_dim=head_dim, dropout=dropout)
        self.mlp_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = ConvMLP(dim=dim, mult=ff_mult, dropout=dropout, kernel_size=kernel_size)

    def forward(self, x, t, mask=None, rope=None):
        norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.attn_norm(x, emb=t)
        x = x + gate_msa.unsqueeze(1) * self.attn(x=norm, mask=mask, rope=rope)
        norm = self.mlp_norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp.unsqueeze(1) * self.mlp(norm)


class SinusPositionEmbedding(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x, scale=1000):
        half_dim = self.dim // 2
        emb = torch.exp(torch.arange(half_dim, device=x.device).float() * -(math.log(10000) / (half_dim - 1)))
        emb = scale * x.unsqueeze(1) * emb.unsqueeze(0)
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim, freq_embed_dim=256):
        super().__init__()
        self.time2emb = SinusPositionEmbedding(freq_embed_dim)
        self.time_emb = nn.Linear(freq_embed_dim, dim)
        self.act = nn.SiLU()
        self.proj = nn.Linear(dim, dim)

    def forward(self, timestep):
        return self.proj(self.act(self.time_emb(self.time2emb(timestep))))


def spectral_init(model, init_std=1.0):
    """DiT._init_weights (same at both commits)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            fan_out, fan_in = module.weight.shape
        elif isinstance(module, nn.Conv1d):
            fan_out, fan_in = module.weight.shape[0], module.weight.shape[1] * module.weight.shape[2]
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=init_std / math.sqrt(model.dim))
            continue
        else:
            continue
        std = (init_std / math.sqrt(fan_in)) * min(1, math.sqrt(fan_out / fan_in))
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
