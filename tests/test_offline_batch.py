"""`rtsvc convert --batch-size N` (upstream's slices per batch): slices of different lengths padded into
one DiT batch give what each gives alone (nothing leaks through the padding: attention keys, the
depthwise convs and V3's rescale std are all masked per item)."""

import numpy as np
import pytest

from rtsvc.offline import convert_offline
from rtsvc.pretrained import resolve_pretrained
from rtsvc.settings import Knobs
from rtsvc.voices.spec import VoiceSpec, open_model
from tests.test_upstream_infer import multi_slice_input
from tests.tiny_models import make_tiny_dit_checkpoint
from tests.upstream.fixtures import make_v3_head


def _voice(ckpt, pretrained, need):
    paths = resolve_pretrained(pretrained, need=need)
    return open_model(VoiceSpec(model=ckpt, backend="torch", device="cpu", f0="dio", streaming=False), paths)


@pytest.mark.parametrize("family", ["v2", "v3"])
def test_a_batch_of_slices_equals_one_at_a_time(family, tiny_pretrained, tiny_pretrained_v3, tmp_path):
    if family == "v2":
        voice = _voice(make_tiny_dit_checkpoint(tmp_path / "v2.ckpt"), tiny_pretrained,
                       ("contentvec", "whisper", "vocoder"))
        knobs = Knobs(steps=4, cfg_strength=1.5)
    else:
        ckpt, _ = make_v3_head(tmp_path / "v3.ckpt")
        voice = _voice(ckpt, tiny_pretrained_v3, ("contentvec", "vocoder"))
        knobs = Knobs(steps=4, skip_cfg_strength=0.3, cfg_skip_layers=1)  # every pass and the rescale
    audio = multi_slice_input()
    one = convert_offline(voice, audio, knobs, release=family)
    four = convert_offline(voice, audio, knobs, release=family, batch_size=4)
    assert np.abs(one).max() > 0.01
    assert np.abs(four - one).max() < 1e-4


def test_padding_would_leak_without_the_masks(tiny_pretrained_v3, tmp_path):
    """The check can fail: the same batch with upstream's mask (attention only) differs."""
    import torch

    from rtsvc.models.flow import Conditioning

    ckpt, _ = make_v3_head(tmp_path / "v3.ckpt")
    voice = _voice(ckpt, tiny_pretrained_v3, ("contentvec", "vocoder"))
    model = voice.backend.model
    g = torch.Generator().manual_seed(0)
    n, k = 40, 25
    x, cvec = torch.randn(1, n, 128, generator=g), torch.randn(1, n, 768, generator=g)
    f0, rms = 150 + torch.rand(1, n, generator=g) * 50, torch.rand(1, n, generator=g)
    mask = (torch.arange(n) < k)[None]
    kw = dict(spk=torch.tensor([0]), f0=f0, rms=rms, cvec=cvec, time=torch.tensor([0.3]))
    with torch.no_grad():
        alone = model(x=x[:, :k], **{**kw, "f0": f0[:, :k], "rms": rms[:, :k], "cvec": cvec[:, :k]})
        masked = model(x=x, mask=mask, items_alone=True, **kw)[:, :k]
        upstream_mask = model(x=x, mask=mask, **kw)[:, :k]
    assert (masked - alone).abs().max() < 1e-5
    assert (upstream_mask - alone).abs().max() > 1e-3
    assert Conditioning(**{k_: v for k_, v in kw.items() if k_ != "time"}).alone() == {}
