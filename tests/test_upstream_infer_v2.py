"""`rtsvc convert` on a V2 model against a transcription of the V2 release's offline path
(tests/upstream/v2_infer.py, ec67126's infer.py: the code the published V2 checkpoint goes with), on
the same checkpoint, encoders, input and noise. Then each way the release differs from c03fa59's
infer.py (which rtsvc follows for V3) alone: slicer, encoders' resampler, defaults."""

import numpy as np
import pytest
import soundfile as sf
import torch

from rtsvc.models.flow import frame_noise
from rtsvc.pretrained import LAYOUT
from rtsvc.voices.model import vocoder_source
from tests.cli_helpers import SR, harmonic_tone, write_wav
from tests.test_upstream_infer import KEY, SEED, STEPS, multi_slice_input, rtsvc_convert
from tests.upstream.fixtures import make_v2_release


@pytest.fixture(scope="module")
def v2_ckpt(tmp_path_factory):
    ckpt, _ = make_v2_release(tmp_path_factory.mktemp("upstream_infer_v2") / "v2.ckpt")
    return ckpt


def upstream_v2_output(audio, ckpt, pretrained, **options):
    from rtsvc.features.rmvpe import Rmvpe
    from rtsvc.models.loading import load_vocoder
    from tests.upstream.v2_infer import infer, load_models

    model, vocoder, rmvpe, hubert, rms, whisper, whisper_fe, spk2idx = load_models(
        ckpt, Rmvpe.load(pretrained / LAYOUT["rmvpe"]), load_vocoder(pretrained / LAYOUT["vocoder"]),
        pretrained / LAYOUT["contentvec"], pretrained / LAYOUT["whisper"])
    return infer(audio, model, vocoder, rmvpe, hubert, rms, whisper, whisper_fe, spk2idx["bob"],
                 noise_for=lambda start, n: frame_noise(start // 512, n, SEED)[None],
                 source_for=lambda start, f0: vocoder_source(f0, 0, start, SEED), key_shift=KEY,
                 infer_steps=STEPS, **options)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("options, flags", [
    ({}, ()),  # the release's defaults: --cfg-strength 0, no loudness restoration
    ({"cfg_strength": 1.5, "restore_loudness": True},
     ("--cfg-strength", "1.5", "--restore-loudness", "true")),
], ids=["defaults", "cfg-and-restore"])
def test_v2_convert_equals_the_v2_release_infer_on_the_same_noise(v2_ckpt, tiny_pretrained, tmp_path, capsys,
                                                                  monkeypatch, options, flags):
    src = write_wav(tmp_path / "in.wav", multi_slice_input())
    audio, _ = sf.read(src, dtype="float32")
    with torch.no_grad():
        want, segments = upstream_v2_output(audio, v2_ckpt, tiny_pretrained, **options)
    assert len(segments) >= 3 and any(n % 512 for _, n in segments)
    got = rtsvc_convert(src, tmp_path / "out.wav", v2_ckpt, tiny_pretrained, capsys, monkeypatch, *flags)
    assert got.shape == want.shape
    assert np.abs(want).max() > 0.01
    assert np.abs(got - want).max() < 1e-4  # 16-bit output file: 1.5e-5 of quantisation in this bound


# --- each way the V2 release differs, alone ------------------------------------------------------

def test_v2_slicer_reproduces_the_release_slicer_py():
    from rtsvc.dsp.slicer import slice_at_silences
    from rtsvc.dsp.slicer_v2 import slice_release_v2
    from tests.upstream.v2_infer import Slicer

    rng = np.random.default_rng(1)
    audio = multi_slice_input()
    cases = [audio, audio * 0.2, np.concatenate([audio, harmonic_tone(30.0, 150.0, 0.3)]),
             np.concatenate([np.zeros(SR), audio]), audio[:3 * SR],  # at most 3 s: one slice
             (0.05 * rng.standard_normal(SR * 2)).astype(np.float32), np.zeros(200, np.float32)]
    for case in cases:
        case = np.asarray(case, dtype=np.float32)
        want = Slicer(SR).slice(case)
        got = slice_release_v2(case, SR)
        assert [p for p, _, _ in got] == [int(p) for p, _ in want]
        for (_, a, b), (_, chunk) in zip(got, want, strict=True):
            assert np.array_equal(case[a:b], chunk)
    # the release's cuts sit on zero crossings and the slice is placed at its 10 ms frame: here the
    # second slice's first sample is 3 samples after where its output goes; c03fa59 cuts elsewhere
    got = slice_release_v2(audio, SR)
    assert any(a != p for p, a, _ in got)
    assert [(a, b) for _, a, b in got] != slice_at_silences(audio, SR)


def test_v2_encoders_hear_torchaudios_default_resampler(tiny_pretrained):
    from rtsvc.dsp.audio import resample as soxr_resample
    from rtsvc.features.extractor import FeatureExtractor
    from rtsvc.pretrained import resolve_pretrained
    from tests.upstream.torchaudio_resample import resample

    rng = np.random.default_rng(2)  # broadband: the resamplers differ near and above 8 kHz
    audio = (harmonic_tone(1.3, 170.0, 0.3) + 0.05 * rng.standard_normal(int(1.3 * SR))).astype(np.float32)
    features = FeatureExtractor.from_pretrained(resolve_pretrained(tiny_pretrained), "dio", family="v2")
    assert features.encoder_sinc_width == 6
    v3 = FeatureExtractor(features.contentvec, None, features.f0_extractor, content_resize="linear")
    assert np.array_equal(v3.encoder_16k(audio), soxr_resample(audio, SR, 16000))  # V3 unchanged
    got = features.encoder_16k(audio)
    want = resample(torch.from_numpy(audio)[None], SR, 16000)[0].numpy()
    assert got.shape == want.shape and np.array_equal(got, want)  # (its kernel in float32, as torchaudio's)
    assert np.abs(got[:len(got) - 2] - soxr_resample(audio, SR, 16000)[:len(got) - 2]).max() > 1e-4


def test_v2_defaults_are_the_releases_and_typed_options_win():
    from rtsvc.offline import V2_RELEASE_CFG, release_rules
    from rtsvc.settings import Knobs

    class Backend:
        family = "v2"

    class V2Voice:
        backend = Backend()

    knobs = Knobs()
    assert knobs.cfg_strength != V2_RELEASE_CFG == 0.0  # the live default stays ours
    got, restore, release = release_rules(V2Voice(), knobs, None, cfg_given=False)
    assert (got.cfg_strength, restore, release) == (0.0, False, "v2")
    got, restore, _ = release_rules(V2Voice(), Knobs(cfg_strength=1.0), True, cfg_given=True)
    assert (got.cfg_strength, restore) == (1.0, True)
    Backend.family = "v3"
    got, restore, release = release_rules(V2Voice(), knobs, None, cfg_given=False)
    assert (got, restore, release) == (knobs, True, "v3")


def test_v2_restores_loudness_measured_before_the_silent_tail():
    """The V2 release measures the converted slice's loudness on the vocoder's n * 512 samples, then
    pads; c03fa59 pads (the last L mod 512 samples silent), then measures."""
    import pyloudnorm

    from rtsvc.offline import convert_offline
    from rtsvc.settings import Knobs

    class Model:  # a model's output: the partial frame comes out silent
        sample_rate, speakers = SR, ["x"]

        def reset(self):
            pass

        def convert(self, audio, knobs, start_sample=0, tail=None):
            out = np.asarray(audio) * 0.3
            out[len(out) // 512 * 512:] = 0
            return out

    audio = (harmonic_tone(0.3, 200.0, 0.2) + 0.01).astype(np.float32)[: 22 * 512 + 480]  # one slice
    meter = pyloudnorm.Meter(SR, block_size=0.1)
    level = meter.integrated_loudness(audio)
    model_out = Model().convert(pyloudnorm.normalize.loudness(audio, level, -18.0), None)
    for release, heard in (("v2", model_out[: len(audio) // 512 * 512]), ("v3", model_out)):
        want = pyloudnorm.normalize.loudness(model_out, meter.integrated_loudness(heard), level)
        got = convert_offline(Model(), audio, Knobs(), release=release)
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.abs(convert_offline(Model(), audio, Knobs(), release="v2")
                  - convert_offline(Model(), audio, Knobs(), release="v3")).max() > 1e-4


def test_v2_refuses_cvec_downsample_rate(tmp_path):
    from rtsvc.errors import UserError
    from rtsvc.offline import UpstreamOptions, convert_file
    from rtsvc.settings import Knobs

    class Backend:
        family = "v2"

    class V2Voice:
        backend, sample_rate = Backend(), SR

    src = write_wav(tmp_path / "in.wav", harmonic_tone(1.0))
    with pytest.raises(UserError, match="applies to V3 models"):
        convert_file(V2Voice(), src, tmp_path / "out.wav", Knobs(),
                     upstream=UpstreamOptions(cvec_downsample_rate=4))
