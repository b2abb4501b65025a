"""rift_svc/dit.py at ec67126 (the V2 release, 2025-01-14): ContentVec + Whisper, gated."""

import torch
from torch import nn

from tests.upstream.modules import (
    AdaLayerNormZero_Final,
    ConvMLP,
    DiTBlock,
    RotaryEmbedding,
    TimestepEmbedding,
    spectral_init,
)


class CondEmbedding(nn.Module):
    def __init__(self, cvec_dim, whisper_dim, cond_dim):
        super().__init__()
        self.f0_embed = nn.Linear(1, cond_dim)
        self.rms_embed = nn.Linear(1, cond_dim)
        self.cvec_embed = nn.Linear(cvec_dim, cond_dim)
        self.whisper_embed = nn.Linear(whisper_dim, cond_dim)
        self.mlp = ConvMLP(cond_dim, cond_dim, mult=2, kernel_size=7)
        self.ln_cvec = nn.LayerNorm(cond_dim, elementwise_affine=False, eps=1e-6)
        self.ln_whisper = nn.LayerNorm(cond_dim, elementwise_affine=False, eps=1e-6)
        self.ln = nn.LayerNorm(cond_dim, elementwise_affine=True, eps=1e-6)
        self.gate_linear = nn.Linear(2 * cond_dim, cond_dim)

    def forward(self, f0, rms, cvec, whisper):
        f0_embed = self.f0_embed(f0.unsqueeze(-1) / 1200)
        rms_embed = self.rms_embed(rms.unsqueeze(-1))
        cvec_embed = self.ln_cvec(self.cvec_embed(cvec))
        whisper_embed = self.ln_whisper(self.whisper_embed(whisper))
        gate = torch.sigmoid(self.gate_linear(torch.cat((cvec_embed, whisper_embed), dim=-1)))
        cond = f0_embed + rms_embed + gate * cvec_embed + (1 - gate) * whisper_embed
        cond = self.mlp(cond) + cond
        return self.ln(cond)


class InputEmbedding(nn.Module):
    def __init__(self, mel_dim, out_dim):
        super().__init__()
        self.mel_embed = nn.Linear(mel_dim, out_dim)
        self.proj = nn.Linear(2 * out_dim, out_dim)
        self.mlp = ConvMLP(out_dim, out_dim, mult=2, kernel_size=7)
        self.ln = nn.LayerNorm(out_dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x, cond_embed):
        x = self.proj(torch.cat((self.mel_embed(x), cond_embed), dim=-1))
        x = self.ln(x)  # the release order: LayerNorm, then the MLP residual (911dd19 swapped them)
        return self.mlp(x) + x


class DiT(nn.Module):
    def __init__(self, dim, depth, head_dim=64, dropout=0.1, ff_mult=4, mel_dim=128, num_speaker=1,
                 cvec_dim=768, whisper_dim=1280, init_std=1):
        super().__init__()
        self.dim = dim
        self.spk_embed = nn.Embedding(num_speaker, dim)
        self.null_whisper_embed = nn.Embedding(1, whisper_dim)
        self.time_embed = TimestepEmbedding(dim)
        self.cond_embed = CondEmbedding(cvec_dim, whisper_dim, dim)
        self.input_embed = InputEmbedding(mel_dim, dim)
        self.rotary_embed = RotaryEmbedding(head_dim)
        self.transformer_blocks = nn.ModuleList(
            [DiTBlock(dim=dim, head_dim=head_dim, ff_mult=ff_mult, dropout=dropout, kernel_size=7)
             for _ in range(depth)])
        self.norm_out = AdaLayerNormZero_Final(dim)
        self.output = nn.Linear(dim, mel_dim)
        spectral_init(self, init_std)
        for block in self.transformer_blocks:
            nn.init.constant_(block.attn_norm.proj.weight, 0)
            nn.init.constant_(block.attn_norm.proj.bias, 0)
        nn.init.constant_(self.cond_embed.mlp.mlp_out.weight, 0)
        nn.init.constant_(self.input_embed.mlp.mlp_out.weight, 0)
        for p in (self.norm_out.proj.weight, self.norm_out.proj.bias, self.output.weight, self.output.bias):
            nn.init.constant_(p, 0)

    def forward(self, x, spk, f0, rms, cvec, whisper, time, drop_whisper, mask=None):
        batch, seq_len = x.shape[0], x.shape[1]
        if time.ndim == 0:
            time = time.repeat(batch)
        t = self.time_embed(time) + self.spk_embed(spk)
        if isinstance(drop_whisper, bool):
            drop_whisper = torch.full((batch,), drop_whisper, device=x.device)
        null_whisper = self.null_whisper_embed.weight[None].expand(batch, seq_len, -1)
        whisper = torch.where(drop_whisper[:, None, None], null_whisper, whisper)
        x = self.input_embed(x, self.cond_embed(f0, rms, cvec, whisper))
        rope = self.rotary_embed.forward_from_seq_len(seq_len)
        for block in self.transformer_blocks:
            x = block(x, t, mask=mask, rope=rope)
        return self.output(self.norm_out(x, t))
