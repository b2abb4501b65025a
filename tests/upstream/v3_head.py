"""RIFT-SVC V3 at c03fa59: rift_svc/dit.py (DiT, LoRA), rift_svc/rf.py (`RF.sample`), and infer.py's
bad_cvec (`extract_features`)."""

import torch
import torch.nn.functional as F
from torch import nn

from tests.upstream.modules import (
    AdaLayerNormZero_Final,
    DiTBlock,
    LoRALinear,
    RotaryEmbedding,
    TimestepEmbedding,
    spectral_init,
)


class CondEmbedding(nn.Module):
    def __init__(self, cvec_dim, cond_dim):
        super().__init__()
        self.f0_embed = nn.Linear(1, cond_dim)
        self.rms_embed = nn.Linear(1, cond_dim)
        self.cvec_embed = nn.Linear(cvec_dim, cond_dim)
        self.out = nn.Linear(cond_dim, cond_dim)
        self.ln_cvec = nn.LayerNorm(cond_dim, elementwise_affine=False, eps=1e-6)
        self.ln = nn.LayerNorm(cond_dim, elementwise_affine=True, eps=1e-6)

    def forward(self, f0, rms, cvec):
        cond = (self.f0_embed(f0.unsqueeze(-1) / 1200) + self.rms_embed(rms.unsqueeze(-1))
                + self.ln_cvec(self.cvec_embed(cvec)))
        return self.ln(self.out(cond))


class InputEmbedding(nn.Module):
    def __init__(self, mel_dim, out_dim):
        super().__init__()
        self.mel_embed = nn.Linear(mel_dim, out_dim)
        self.proj = nn.Linear(2 * out_dim, out_dim)
        self.ln = nn.LayerNorm(out_dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x, cond_embed):
        return self.ln(self.proj(torch.cat((self.mel_embed(x), cond_embed), dim=-1)))


class DiT(nn.Module):
    def __init__(self, dim, depth, head_dim=64, dropout=0.0, ff_mult=4, n_mel_channels=128, num_speaker=1,
                 cvec_dim=768, kernel_size=31, zero_null_spk=False, init_std=1):
        super().__init__()
        self.dim = dim
        self.spk_embed = nn.Embedding(num_speaker, dim)
        self.null_spk_embed = nn.Embedding(1, dim)
        self.tembed = TimestepEmbedding(dim)
        self.cond_embed = CondEmbedding(cvec_dim, dim)
        self.input_embed = InputEmbedding(n_mel_channels, dim)
        self.rotary_embed = RotaryEmbedding(head_dim)
        self.transformer_blocks = nn.ModuleList(
            [DiTBlock(dim=dim, head_dim=head_dim, ff_mult=ff_mult, dropout=dropout, kernel_size=kernel_size)
             for _ in range(depth)])
        self.norm_out = AdaLayerNormZero_Final(dim)
        self.output = nn.Linear(dim, n_mel_channels)
        spectral_init(self, init_std)
        for block in self.transformer_blocks:
            nn.init.constant_(block.attn_norm.proj.weight, 0)
            nn.init.constant_(block.attn_norm.proj.bias, 0)
        for p in (self.norm_out.proj.weight, self.norm_out.proj.bias, self.output.weight, self.output.bias):
            nn.init.constant_(p, 0)
        if zero_null_spk:
            self.null_spk_embed.weight.data.zero_()

    def forward(self, x, spk, f0, rms, cvec, time, drop_speaker=False, mask=None, skip_layers=None):
        batch, seq_len = x.shape[0], x.shape[1]
        if time.ndim == 0:
            time = time.repeat(batch)
        if isinstance(drop_speaker, bool):
            drop_speaker = torch.full((batch,), drop_speaker, dtype=torch.bool, device=x.device)
        spk_embeds = self.spk_embed(spk)
        null_spk_embeds = self.null_spk_embed(torch.zeros_like(spk, dtype=torch.long))
        spk_embeds = torch.where(drop_speaker.unsqueeze(-1), null_spk_embeds, spk_embeds)
        t = self.tembed(time) + spk_embeds
        x = self.input_embed(x, self.cond_embed(f0, rms, cvec))
        rope = self.rotary_embed.forward_from_seq_len(seq_len)
        if isinstance(skip_layers, int):
            skip_layers = [skip_layers]
        for i, block in enumerate(self.transformer_blocks):
            if skip_layers is not None and i in skip_layers:
                continue
            x = block(x, t, mask=mask, rope=rope)
        return self.output(self.norm_out(x, t))

    def apply_lora(self, rank, alpha):
        for p in self.parameters():
            p.requires_grad = False
        self.spk_embed.weight.requires_grad = True
        for block in self.transformer_blocks:
            block.attn.k_proj = LoRALinear(block.attn.k_proj, rank, alpha)
            block.attn.v_proj = LoRALinear(block.attn.v_proj, rank, alpha)

    def freeze_adaln_and_tembed(self):
        for module in [self.tembed, self.norm_out] + [b.attn_norm for b in self.transformer_blocks]:
            for p in module.parameters():
                p.requires_grad = False


def lens_to_mask(frame_len, length=None):
    length = length or int(frame_len.amax())
    return torch.arange(length, device=frame_len.device)[None, :] < frame_len[:, None]


def linear_interpolate_tensor(tensor, new_size):
    return F.interpolate(tensor.transpose(0, 1).unsqueeze(0), size=new_size, mode="linear",
                         align_corners=True).squeeze(0).transpose(0, 1)


def make_bad_cvec(cvec, n_frames, cvec_downsample_rate=2):
    """infer.extract_features: cvec [1, n, 768] (already on the mel grid) -> bad_cvec [1, n, 768]."""
    cvec_ds = cvec.clone()[0, ::2, :]
    cvec_ds = linear_interpolate_tensor(cvec_ds, cvec_ds.shape[0] // cvec_downsample_rate)
    return linear_interpolate_tensor(cvec_ds, n_frames)[None, :]


class RF(nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer
        self.mel_min, self.mel_max = -12, 2

    @torch.no_grad()
    def sample(self, src_mel, spk_id, f0, rms, cvec, frame_len=None, steps=32, bad_cvec=None,
               ds_cfg_strength=0.0, spk_cfg_strength=0.0, skip_cfg_strength=0.0, cfg_skip_layers=None,
               cfg_rescale=0.7, noise=None):
        """`noise` (a test hook, not upstream): the start noise y0, instead of torch.randn's draw."""
        batch, mel_seq_len, num_mel_channels = src_mel.shape
        device = src_mel.device
        if frame_len is None:
            frame_len = torch.full((batch,), mel_seq_len, device=device)
        mask = lens_to_mask(frame_len)

        def fn(t, x):
            use_ds_cfg, use_spk_cfg = ds_cfg_strength > 1e-5, spk_cfg_strength > 1e-5
            use_skip_cfg = skip_cfg_strength > 1e-5
            cfg_flag = use_ds_cfg or use_skip_cfg or use_spk_cfg
            num_cond = 1 + int(use_ds_cfg) + int(use_spk_cfg)
            if num_cond == 1:
                pred = self.transformer(x=x, spk=spk_id, f0=f0, rms=rms, cvec=cvec, time=t, mask=mask)
                std_pred = pred.std() if cfg_rescale > 1e-5 and cfg_flag else None
            else:
                if use_ds_cfg and use_spk_cfg:
                    cvec_b = torch.stack([cvec, bad_cvec, cvec], dim=1).reshape(-1, *cvec.shape[1:])
                elif use_ds_cfg:
                    cvec_b = torch.stack([cvec, bad_cvec], dim=1).reshape(-1, *cvec.shape[1:])
                else:
                    cvec_b = cvec.repeat_interleave(num_cond, dim=0)
                drop = torch.zeros(batch * num_cond, dtype=torch.bool, device=x.device)
                if use_spk_cfg:
                    drop[num_cond - 1::num_cond] = True
                preds = self.transformer(
                    x=x.repeat_interleave(num_cond, dim=0), spk=spk_id.repeat_interleave(num_cond, dim=0),
                    f0=f0.repeat_interleave(num_cond, dim=0), rms=rms.repeat_interleave(num_cond, dim=0),
                    cvec=cvec_b, time=t, mask=mask.repeat_interleave(num_cond, dim=0), drop_speaker=drop)
                std_pred = preds[0::num_cond].std() if cfg_rescale > 1e-5 and cfg_flag else None
                preds = preds.reshape(batch, num_cond, *preds.shape[1:])
                pred = preds[:, 0]
                idx = 1
                if use_ds_cfg:
                    pred = pred + (pred - preds[:, idx]) * ds_cfg_strength
                    idx += 1
                if use_spk_cfg:
                    pred = pred + (pred - preds[:, idx]) * spk_cfg_strength
            if use_skip_cfg:
                skip_pred = self.transformer(x=x, spk=spk_id, f0=f0, rms=rms, cvec=cvec, time=t, mask=mask,
                                             skip_layers=cfg_skip_layers)
                pred = pred + (pred - skip_pred) * skip_cfg_strength
            if cfg_rescale > 1e-5 and cfg_flag:
                pred = cfg_rescale * (pred * (std_pred / pred.std())) + (1 - cfg_rescale) * pred
            return pred

        y0 = torch.randn(batch, mel_seq_len, num_mel_channels, device=device) if noise is None else noise
        y0 = y0.masked_fill(~mask.unsqueeze(-1), 0)
        t = torch.linspace(0, 1, steps, device=device)
        y = y0  # torchdiffeq odeint(method='euler') over the grid t
        for k in range(steps - 1):
            y = y + (t[k + 1] - t[k]) * fn(t[k], y)
        out = (y + 1) / 2 * (self.mel_max - self.mel_min) + self.mel_min
        return torch.where(mask.unsqueeze(-1), out, src_mel)
