"""Guidance of both RIFT-SVC families, from one `Guidance` holding every family's settings (each
family's record in `rtsvc.models.families` says which it reads and which velocity it runs).

V2 (`rtsvc.models.flow.cfg_velocity`): classifier-free guidance on Whisper,
    v = v_null + cfg_strength * (v_full - v_null).

V3 (upstream rf.py `RF.sample` at c03fa59), p_c = the velocity with every condition:
    p = p_c
    ds   > 0: p += ds   * (p - v(cvec = bad_cvec))        content-degradation guidance
    spk  > 0: p += spk  * (p - v(null speaker))           speaker guidance
    skip > 0: p += skip * (p - v(skip cfg_skip_layers))   skip-layer guidance
    rescale > 0 and any of them on: p = r * p * std(p_c) / std(p) + (1 - r) * p
each step using the updated p; std is the unbiased std over the whole tensor (batch, frames incl.
padding, channels). The p_c, bad-cvec and null-speaker passes run as one batched forward, items
interleaved per input item as upstream; the skip pass is a second forward. A strength <= 1e-5
skips its pass. `bad_cvec` is upstream's `extract_features` blur of the mel-aligned ContentVec
(`degrade_content`).
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from rtsvc.models.flow import CFG_EPS, Conditioning

CVEC_DOWNSAMPLE_RATE = 2  # upstream --cvec-downsample-rate


@dataclass(frozen=True)
class Guidance:
    """Guidance settings of both families; each family reads its own (names as upstream's CLI)."""
    cfg_strength: float = 2.0  # V2: Whisper CFG
    ds_cfg_strength: float = 0.2  # V3: content-degradation guidance
    spk_cfg_strength: float = 0.8  # V3: speaker guidance (null speaker)
    skip_cfg_strength: float = 0.0  # V3: skip-layer guidance
    cfg_skip_layers: tuple[int, ...] | None = None  # V3: blocks bypassed by the skip pass (0-based)
    cfg_rescale: float = 0.7  # V3: guidance rescale


def degrade_content(cvec: torch.Tensor, rate: int = CVEC_DOWNSAMPLE_RATE) -> torch.Tensor:
    """Upstream's bad_cvec: of the mel-aligned ContentVec [b, n, d] keep frames 0, 2, 4, ..., resize
    them linearly (align_corners) to count // rate frames, then back to n (a ~4x blur in time)."""
    n = cvec.shape[1]
    kept = cvec[:, ::2].transpose(1, 2)  # [b, d, ceil(n / 2)]
    low = F.interpolate(kept, size=max(1, kept.shape[-1] // rate), mode="linear", align_corners=True)
    return F.interpolate(low, size=n, mode="linear", align_corners=True).transpose(1, 2)


def bad_cvec_of(cond: Conditioning) -> torch.Tensor:
    """The condition's degraded content: the one prepared with it (per window or item), else made now."""
    return cond.bad_cvec if cond.bad_cvec is not None else degrade_content(cond.cvec)


def with_bad_cvec(cond: Conditioning, guidance: Guidance) -> Conditioning:
    """`cond` with its bad_cvec made, when content-degradation guidance is on and it has none."""
    if guidance.ds_cfg_strength <= CFG_EPS:
        return cond
    return replace(cond, bad_cvec=bad_cvec_of(cond))


def v3_velocity(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                guidance: Guidance) -> torch.Tensor:
    """Guided V3 velocity [b, n, 128] at noisy mel x and time t (see the module docstring)."""
    g = guidance
    b = x.shape[0]
    t = t.reshape(-1).expand(b) if t.numel() == 1 else t
    use_ds, use_spk = g.ds_cfg_strength > CFG_EPS, g.spk_cfg_strength > CFG_EPS
    use_skip = g.skip_cfg_strength > CFG_EPS
    guided = use_ds or use_spk or use_skip
    cvecs, drops = [cond.cvec], [False]
    if use_ds:
        bad = bad_cvec_of(cond)
        cvecs.append(bad)
        drops.append(False)
    if use_spk:
        cvecs.append(cond.cvec)
        drops.append(True)
    k = len(cvecs)

    def rep(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.repeat_interleave(k, dim=0)

    preds = model(x=rep(x), spk=rep(cond.spk), f0=rep(cond.f0), rms=rep(cond.rms),
                  cvec=torch.stack(cvecs, dim=1).flatten(0, 1), time=rep(t),
                  drop_speaker=torch.tensor(drops, device=x.device).repeat(b), mask=rep(cond.mask),
                  **cond.alone())
    preds = preds.unflatten(0, (b, k))
    pred = preds[:, 0]
    per_item = cond.mask if cond.items_alone else None
    std_cond = _std(pred, per_item)
    branch = 1
    if use_ds:
        pred = pred + (pred - preds[:, branch]) * g.ds_cfg_strength
        branch += 1
    if use_spk:
        pred = pred + (pred - preds[:, branch]) * g.spk_cfg_strength
    if use_skip:
        skipped = model(x=x, spk=cond.spk, f0=cond.f0, rms=cond.rms, cvec=cond.cvec, time=t, mask=cond.mask,
                        skip_layers=list(g.cfg_skip_layers) if g.cfg_skip_layers is not None else None,
                        **cond.alone())
        pred = pred + (pred - skipped) * g.skip_cfg_strength
    if g.cfg_rescale > CFG_EPS and guided:
        pred = g.cfg_rescale * (pred * (std_cond / _std(pred, per_item))) + (1 - g.cfg_rescale) * pred
    return pred


def _std(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rescale's unbiased std: over the whole tensor (upstream), or with a frame mask [b, n] (padded
    slices batched offline) per item over its valid frames, what that item alone would give: [b, 1, 1]."""
    if mask is None:
        return x.std()
    valid = mask[..., None].to(x.dtype)
    count = valid.sum(dim=(1, 2), keepdim=True) * x.shape[-1]
    mean = (x * valid).sum(dim=(1, 2), keepdim=True) / count
    return (((x - mean) * valid).square().sum(dim=(1, 2), keepdim=True) / (count - 1)).sqrt()


def v3_velocity_all_branches(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                             ds: torch.Tensor, spk: torch.Tensor, skip: torch.Tensor, rescale: torch.Tensor,
                             skip_layers: tuple[int, ...] | None = None) -> torch.Tensor:
    """`v3_velocity` with the strengths as 0-d tensors, for a traced graph (ONNX): every pass runs
    (the p_c / bad-cvec / null-speaker batch, and the skip pass when `skip_layers` is given), and a
    strength <= 1e-5 contributes nothing, which gives `v3_velocity`'s value for any strengths."""
    b = x.shape[0]
    t = t.reshape(-1).expand(b) if t.numel() == 1 else t
    bad = bad_cvec_of(cond)

    def rep(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.repeat_interleave(3, dim=0)

    drops = torch.arange(3 * b, device=x.device) % 3 == 2  # [plain, bad cvec, null speaker] per item
    preds = model(x=rep(x), spk=rep(cond.spk), f0=rep(cond.f0), rms=rep(cond.rms),
                  cvec=torch.stack((cond.cvec, bad, cond.cvec), dim=1).flatten(0, 1), time=rep(t),
                  drop_speaker=drops).unflatten(0, (b, 3))
    pred = preds[:, 0]
    per_item = cond.mask if cond.items_alone else None
    std_cond = _std(pred, per_item)
    ds_on, spk_on, skip_on = ds > CFG_EPS, spk > CFG_EPS, skip > CFG_EPS
    pred = torch.where(ds_on, pred + (pred - preds[:, 1]) * ds, pred)
    pred = torch.where(spk_on, pred + (pred - preds[:, 2]) * spk, pred)
    if skip_layers is not None:
        skipped = model(x=x, spk=cond.spk, f0=cond.f0, rms=cond.rms, cvec=cond.cvec, time=t,
                        skip_layers=list(skip_layers))
        pred = torch.where(skip_on, pred + (pred - skipped) * skip, pred)
    else:
        skip_on = torch.zeros_like(skip_on)
    rescaled = rescale * (pred * (std_cond / pred.std())) + (1 - rescale) * pred
    return torch.where((ds_on | spk_on | skip_on) & (rescale > CFG_EPS), rescaled, pred)

