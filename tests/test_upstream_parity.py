"""Checkpoints made by (transcriptions of) the upstream code load through `load_dit` and compute
what upstream computes: V2 as released (ec67126), V3 at c03fa59 with and without LoRA."""

import pytest
import torch

from rtsvc.models import load_dit
from tests.upstream.fixtures import make_v2_release, make_v3_head

N = 37  # frames; not a multiple of anything


def _inputs(b=2, n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, n - 5:] = False  # a padded item, as in a batch of unequal clips
    return dict(x=torch.randn(b, n, 128, generator=g), spk=torch.tensor([0, 1])[:b],
                f0=200 + 100 * torch.rand(b, n, generator=g), rms=torch.rand(b, n, generator=g) * 0.2,
                cvec=torch.randn(b, n, 768, generator=g), time=torch.rand(b, generator=g), mask=mask)


def test_v2_release_checkpoint_matches_upstream(tmp_path):
    path, upstream = make_v2_release(tmp_path / "v2.ckpt")
    loaded = load_dit(path)
    assert loaded.family == "v2" and loaded.speakers == {"alice": 0, "bob": 1}
    kw = _inputs()
    kw["whisper"] = torch.randn(2, N, 1280, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for drop in (False, True, torch.tensor([True, False])):
            ours, ref = loaded.model(**kw, drop_whisper=drop), upstream(**kw, drop_whisper=drop)
            assert (ours - ref).abs().max() < 1e-4
        # the branches differ, so the comparison above would catch a swapped null embedding
        null, full = loaded.model(**kw, drop_whisper=True), loaded.model(**kw, drop_whisper=False)
        assert (null - full).abs().max() > 1e-3


@pytest.mark.parametrize("lora", [None, (4, 8.0)])
def test_v3_checkpoint_matches_upstream(tmp_path, lora):
    rank, alpha = lora or (None, None)
    path, upstream = make_v3_head(tmp_path / "v3.ckpt", lora_rank=rank, lora_alpha=alpha)
    loaded = load_dit(path)
    assert loaded.family == "v3" and loaded.config.lora_rank == rank
    kw = _inputs()
    with torch.no_grad():
        for extra in ({}, {"drop_speaker": True}, {"drop_speaker": torch.tensor([False, True])},
                      {"skip_layers": 1}, {"skip_layers": [0, 1]}):
            ours, ref = loaded.model(**kw, **extra), upstream(**kw, **extra)
            assert (ours - ref).abs().max() < 1e-4, extra
        assert (loaded.model(**kw, drop_speaker=True) - loaded.model(**kw)).abs().max() > 1e-3


def test_lora_adapters_change_the_output_and_merge_exactly(tmp_path):
    path, _ = make_v3_head(tmp_path / "lora.ckpt", lora_rank=4, lora_alpha=8.0)
    loaded = load_dit(path)
    kw = _inputs()
    with torch.no_grad():
        before = loaded.model(**kw)
        base = loaded.model.transformer_blocks[0].attn.k_proj
        scale = base.scale
        assert scale == pytest.approx(8.0 / 2.0)  # alpha / sqrt(rank)
        loaded.model.merge_lora()
        assert isinstance(loaded.model.transformer_blocks[0].attn.k_proj, torch.nn.Linear)
        after = loaded.model(**kw)
    assert (before - after).abs().max() < 1e-4
    assert not any(k.endswith((".A", ".B")) for k in loaded.model.state_dict())


def test_lora_checkpoint_without_alpha_is_refused(tmp_path):
    from omegaconf import OmegaConf

    from rtsvc.errors import UserError
    path, _ = make_v3_head(tmp_path / "lora.ckpt", lora_rank=4, lora_alpha=8.0)
    ckpt = torch.load(path, weights_only=False)
    cfg = OmegaConf.to_container(ckpt["hyper_parameters"]["cfg"])
    del cfg["training"]["lora_alpha"]
    ckpt["hyper_parameters"]["cfg"] = OmegaConf.create(cfg)
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="no hyper_parameters.cfg.training.lora_alpha"):
        load_dit(path)


def _strengths(ds, spk, skip, layers, rescale):
    return dict(ds_cfg_strength=ds, spk_cfg_strength=spk, skip_cfg_strength=skip, cfg_skip_layers=layers,
                cfg_rescale=rescale)


@pytest.mark.parametrize("strengths", [
    _strengths(0.2, 0.8, 0.0, None, 0.7),  # upstream's defaults
    _strengths(0.2, 0.0, 0.5, 1, 0.7),
    _strengths(0.0, 1.0, 0.0, None, 0.0),
    _strengths(0.0, 0.0, 0.0, None, 0.7),
])
def test_v3_sampler_matches_upstream_on_the_same_noise(tmp_path, strengths):
    from rtsvc.dsp.mel import denormalize_mel
    from rtsvc.models.families import guided_velocity
    from rtsvc.models.flow import Conditioning, sample
    from rtsvc.models.guidance import Guidance, degrade_content
    from tests.upstream.v3_head import RF, make_bad_cvec

    path, upstream = make_v3_head(tmp_path / "v3.ckpt", lora_rank=2, lora_alpha=4.0)
    loaded = load_dit(path)
    kw = _inputs(b=2)
    src_mel = torch.full((2, N, 128), -7.0)
    frame_len = kw["mask"].sum(1)
    bad = torch.cat([make_bad_cvec(kw["cvec"][i:i + 1], N) for i in range(2)])
    assert torch.allclose(degrade_content(kw["cvec"]), bad, atol=1e-6)
    steps = 6
    torch.manual_seed(123)
    ref = RF(upstream).sample(src_mel, kw["spk"], kw["f0"], kw["rms"], kw["cvec"], frame_len=frame_len,
                              steps=steps, bad_cvec=bad, **strengths)

    layers = strengths.pop("cfg_skip_layers")
    guidance = Guidance(**strengths, cfg_skip_layers=None if layers is None else (layers,))
    cond = Conditioning(spk=kw["spk"], f0=kw["f0"], rms=kw["rms"], cvec=kw["cvec"], mask=kw["mask"])
    torch.manual_seed(123)
    noise = torch.randn(2, N, 128).masked_fill(~kw["mask"][..., None], 0)  # upstream's first draw
    with torch.no_grad():
        x = sample(lambda x, t: guided_velocity(loaded.model, x, t, cond, guidance), noise, steps)
    ours = torch.where(kw["mask"][..., None], denormalize_mel(x), src_mel)
    assert (ours - ref).abs().max() < 1e-4
