"""`rtsvc convert` against a transcription of upstream's offline path (tests/upstream/v3_infer.py,
c03fa59's infer.py), on the same checkpoint, encoders, input and noise: slicing, loudness, frame grid,
RMVPE's resampler, features, sampler, vocoder and joins together. Then each listed difference alone."""

import numpy as np
import pytest
import soundfile as sf
import torch

from rtsvc.models.flow import frame_noise
from rtsvc.pretrained import LAYOUT
from rtsvc.voices.model import vocoder_source
from tests.cli_helpers import SR, harmonic_tone, run_cli, write_wav
from tests.tiny_encoders import make_tiny_pretrained_dir
from tests.upstream.fixtures import make_v3_head

SEED, STEPS, KEY = 3, 6, 2


def multi_slice_input() -> np.ndarray:
    """~12 s of voice-like phrases at different levels and pitches between silences: a leading
    silence, long gaps (dropped), a 0.3 s gap (upstream's medium-silence case) and a short one; no slice
    is a whole number of 512-sample frames."""
    rng = np.random.default_rng(7)
    parts = [np.zeros(int(0.37 * SR)), harmonic_tone(3.31, 140.0, 0.25, vibrato=0.03),
             np.zeros(int(0.9 * SR)),
             harmonic_tone(3.17, 210.0, 0.08, vibrato=0.02), np.zeros(int(0.3 * SR)),
             harmonic_tone(3.05, 175.0, 0.4, vibrato=0.04), np.zeros(int(0.15 * SR)),
             harmonic_tone(1.2, 120.0, 0.2), np.zeros(int(0.61 * SR))]
    audio = np.concatenate(parts).astype(np.float32)
    return audio + (1e-4 * rng.standard_normal(len(audio))).astype(np.float32)  # not digital silence


@pytest.fixture(scope="module")
def v3_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream_infer")
    ckpt, _ = make_v3_head(root / "v3.ckpt")
    return ckpt, make_tiny_pretrained_dir(root / "pretrained")


def upstream_output(audio, ckpt, pretrained, **options):
    from rtsvc.features.rmvpe import Rmvpe
    from rtsvc.models.loading import load_vocoder
    from tests.upstream.v3_infer import infer, load_models

    svc, vocoder, rmvpe, hubert, rms, spk2idx = load_models(
        ckpt, Rmvpe.load(pretrained / LAYOUT["rmvpe"]), load_vocoder(pretrained / LAYOUT["vocoder"]),
        pretrained / LAYOUT["contentvec"])
    return infer(audio, svc, vocoder, rmvpe, hubert, rms, spk2idx["bob"],
                 noise_for=lambda start, n: frame_noise(start // 512, n, SEED)[None],
                 source_for=lambda start, f0: vocoder_source(f0, 0, start, SEED), key_shift=KEY,
                 infer_steps=STEPS, **options)


def rtsvc_convert(src, out, ckpt, pretrained, capsys, monkeypatch, *extra):
    args = ["convert", src, out, "--model", ckpt, "--pretrained-dir", pretrained, "--f0", "rmvpe",
            "--steps", STEPS, "--speaker", "bob", "--device", "cpu", "--seed", SEED, "--pitch", KEY, *extra]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    got, sr = sf.read(out, dtype="float64")
    assert sr == SR
    return got


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_v3_convert_equals_upstream_infer_on_the_same_noise(v3_setup, tmp_path, capsys, monkeypatch):
    ckpt, pretrained = v3_setup
    src = write_wav(tmp_path / "in.wav", multi_slice_input())
    audio, _ = sf.read(src, dtype="float32")  # what both read (torchaudio.load gives the same floats)
    with torch.no_grad():
        want, segments = upstream_output(audio, ckpt, pretrained)
    assert len(segments) >= 3  # several slices, joined with fades
    assert any(n % 512 for _, n in segments)
    got = rtsvc_convert(src, tmp_path / "out.wav", ckpt, pretrained, capsys, monkeypatch)
    assert got.shape == want.shape
    assert np.abs(want).max() > 0.01  # sound, not silence
    # the output file is 16-bit PCM: 1.5e-5 of quantisation is in this bound
    assert np.abs(got - want).max() < 1e-4


# --- each difference from issue 22 alone ---------------------------------------------------------

def test_frame_grid_is_floor_and_the_partial_frame_comes_out_silent():
    from rtsvc.features.frames import mel_frame_count
    from tests.upstream.v3_infer import RMSExtractor, get_mel_spectrogram

    for length in (1023, 1024, 44100, 44100 * 3 + 511):  # (upstream's reflect pad needs > 768 samples)
        x = torch.randn(1, length) * 0.1
        assert mel_frame_count(length) == get_mel_spectrogram(x).shape[-1] == RMSExtractor()(x).shape[-1] \
            == length // 512


def test_model_voice_gives_floor_frames_and_a_silent_tail(tmp_path):
    from rtsvc.settings import Knobs
    from rtsvc.voices.spec import VoiceSpec, open_model

    ckpt, _ = make_v3_head(tmp_path / "v3.ckpt")
    pretrained = make_tiny_pretrained_dir(tmp_path / "pretrained")
    from rtsvc.pretrained import resolve_pretrained

    paths = resolve_pretrained(pretrained, need=("contentvec", "vocoder"))
    voice = open_model(VoiceSpec(model=ckpt, backend="torch", device="cpu", f0="dio", streaming=False), paths)
    audio = harmonic_tone(0.5, 180.0)[: 40 * 512 + 300]
    out = voice.convert(audio, Knobs(steps=2))
    assert out.shape == audio.shape
    assert np.all(out[40 * 512:] == 0) and np.abs(out[: 40 * 512]).max() > 1e-3
    feats = voice.features.extract(audio)  # the extractor's grid is the voice's grid
    assert feats.n_frames == 40
    streaming = voice.for_streaming()  # the streaming cache agrees on aligned windows
    f0, rms, cvec, _ = streaming.cache.window(audio[: 40 * 512], 0)
    assert f0.shape[0] == rms.shape[0] == cvec.shape[0] == 40


def test_sinc_resampler_equals_the_torchaudio_transcription():
    from rtsvc.dsp.sinc import sinc_kernel, sinc_resample
    from tests.upstream.torchaudio_resample import Resample, resample

    kernel, width = sinc_kernel(44100, 16000, 128)
    ref = Resample(44100, 16000, lowpass_filter_width=128)
    assert width == ref.width == 357 and torch.equal(kernel, ref.kernel)
    x = np.random.default_rng(0).standard_normal(44100 + 37).astype(np.float32) * 0.3
    got = sinc_resample(x, 44100, 16000)
    want = ref(torch.from_numpy(x)[None])[0].numpy()
    assert got.shape == want.shape == (16014,) and np.array_equal(got, want)
    # other rates and the functional form (kernel in the waveform's dtype) too
    for src, dst, width in ((48000, 16000, 6), (22050, 44100, 128)):
        want = resample(torch.from_numpy(x), src, dst, lowpass_filter_width=width).numpy()
        np.testing.assert_allclose(sinc_resample(x, src, dst, width), want, atol=1e-6)
    # it is not soxr: the band above ~7.9 kHz is what differs
    from rtsvc.dsp.audio import resample as soxr_resample

    soxr = soxr_resample(x, 44100, 16000)  # (16013 samples: soxr rounds the length, torchaudio ceils)
    assert np.abs(soxr - got[:len(soxr)]).max() > 1e-3


def test_slicer_reproduces_upstream_slicer_py():
    from rtsvc.dsp.slicer import slice_at_silences
    from tests.upstream.v3_infer import Slicer

    rng = np.random.default_rng(1)
    audio = multi_slice_input()
    cases = [audio, audio * 0.2,  # quieter: upstream's absolute threshold drops the quiet phrases
             np.concatenate([audio, harmonic_tone(30.0, 150.0, 0.3)]),  # 30 s with no silence: no max length
             (0.05 * rng.standard_normal(SR * 2)).astype(np.float32), np.zeros(200, np.float32)]
    for case in cases:
        want = [(int(s), int(s) + len(c)) for s, c in Slicer(SR, -30, 3000, 100, 10, 200).slice(case)]
        assert slice_at_silences(case, SR) == want
    # on purpose: input that is all below the threshold is converted whole (upstream converts nothing)
    quiet = audio * 0.05
    assert Slicer(SR, -30, 3000, 100, 10, 200).slice(quiet) == []
    assert slice_at_silences(quiet, SR) == [(0, len(quiet))]
    assert len(slice_at_silences(cases[2], SR)[-1]) and slice_at_silences(cases[2], SR)[-1][1] \
        - slice_at_silences(cases[2], SR)[-1][0] > 30 * SR


def test_joins_are_upstreams_fades_and_crossfade_is_an_option():
    from rtsvc.dsp.slicer import join_with_fades
    from rtsvc.offline import convert_offline
    from rtsvc.settings import Knobs
    from tests.upstream.v3_infer import apply_fade

    fade, n = 882, 20000
    a, b = np.ones(9000), np.ones(n - 9500)
    got = join_with_fades([(0, a), (9500, b)], n, fade)
    want = np.zeros(n + fade)  # upstream's loop, by hand
    a2 = a.copy()
    a2[-fade:] *= np.linspace(1, 0, fade)
    want[:9000] += a2
    b2 = apply_fade(b.copy(), fade, fade_in=True)
    want[9500:9500 + fade] *= np.linspace(1, 0, fade)
    want[9500:9500 + len(b2)] += b2
    np.testing.assert_allclose(got, want[:n], atol=1e-7)
    assert got[9000 - 1] == 0 and got[9500] == 0  # the dip: linear out to 0, half-Hann in from 0

    class Echo:
        sample_rate, speakers = SR, ["echo"]

        def reset(self):
            pass

        def convert(self, audio, knobs, start_sample=0, tail=None):
            return audio

    audio = multi_slice_input()
    faded = convert_offline(Echo(), audio, Knobs(), target_lufs=None)
    crossfaded = convert_offline(Echo(), audio, Knobs(), target_lufs=None, join="crossfade")
    cut = 493038  # two slices meet here with no silence between them
    assert abs(faded[cut]) < 1e-6 < abs(audio[cut - 300:cut + 300]).max()  # upstream: a dip
    # ours: none
    np.testing.assert_allclose(crossfaded[cut - 300:cut + 300], audio[cut - 300:cut + 300], atol=1e-6)


def test_loudness_is_normalised_per_slice_then_restored_by_default(tmp_path):
    import pyloudnorm

    from rtsvc.offline import convert_offline
    from rtsvc.settings import Knobs

    class Gain:
        sample_rate, speakers = SR, ["x"]

        def __init__(self):
            self.levels = []

        def reset(self):
            pass

        def convert(self, audio, knobs, start_sample=0, tail=None):
            self.levels.append(meter.integrated_loudness(audio))
            return audio * 0.3

    meter = pyloudnorm.Meter(SR, block_size=0.1)
    audio = multi_slice_input()
    voice = Gain()
    out = convert_offline(voice, audio, Knobs())
    assert np.allclose(voice.levels, -18.0, atol=0.01)  # every slice heard at -18 LUFS
    a, b = 7497, 163611  # first slice: restored to its input loudness despite the voice's gain
    assert abs(meter.integrated_loudness(out[a + 1000:b - 1000]) - meter.integrated_loudness(
        audio[a + 1000:b - 1000])) < 0.3
    kept = convert_offline(Gain(), audio, Knobs(), restore_loudness=False)
    assert abs(meter.integrated_loudness(kept[a + 1000:b - 1000]) - (-18 + 20 * np.log10(0.3))) < 0.3
    loud = convert_offline(Gain(), audio * 3.0, Knobs(), target_lufs=0.0, restore_loudness=False)
    assert np.abs(loud).max() <= 0.99 * 0.3 + 1e-6  # upstream's peak rule: over 1.0 -> 0.99


def test_upstream_option_names_reach_the_conversion(tmp_path, capsys, monkeypatch):
    import rtsvc.offline

    seen = {}

    def fake_convert_file(voice, src, out, knobs, progress=None, **kw):
        seen.update(kw, knobs=knobs)
        return 1.0

    monkeypatch.setattr(rtsvc.offline, "convert_file", fake_convert_file)
    src = write_wav(tmp_path / "in.wav", harmonic_tone(1.0))
    args = ["convert", src, tmp_path / "o.wav", "--key-shift", "3", "--infer-steps", "7",
            "--restore-loudness", "False", "--target-loudness", "-20", "--fade-duration", "30",
            "--cvec-downsample-rate", "2", "--batch-size", "1"]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert seen["knobs"].pitch_shift == 3 and seen["knobs"].steps == 7
    assert seen["upstream"].restore_loudness is False and seen["fade_ms"] == 30 and seen["join"] == "fades"
    assert seen["target_lufs"] is None  # the DSP voice keeps each slice's level
    code, _, _ = run_cli(args[:3], capsys, monkeypatch)
    assert seen["upstream"].restore_loudness is None  # not given: the model family's default
    code, _, err = run_cli([*args[:3], "--restore-loudness", "maybe"], capsys, monkeypatch)
    assert code == 2 and "--restore-loudness takes true or false" in err
    code, _, err = run_cli([*args[:3], "--batch-size", "4"], capsys, monkeypatch)  # no --model
    assert code == 2 and "--batch-size applies to models converting offline" in err
    code, _, err = run_cli([*args[:3], "--batch-size", "0"], capsys, monkeypatch)
    assert code == 2 and "--batch-size must be at least 1" in err
    code, _, err = run_cli([*args[:3], "--robust-f0", "3"], capsys, monkeypatch)
    assert code == 2 and "--robust-f0 takes 0, 1 or 2" in err
    code, _, err = run_cli([*args[:3], "--robust-f0", "1"], capsys, monkeypatch)  # no --model
    assert code == 2 and "--robust-f0 applies to models" in err


def test_convert_stream_does_not_measure_blocks_or_advise(tmp_path, capsys, monkeypatch):
    """Issue 24: a file needs no real-time tuning: the live default block, no measurement."""
    import rtsvc.autoblock
    import rtsvc.offline

    monkeypatch.setattr(rtsvc.autoblock, "pick_block", lambda *a, **k: pytest.fail("measured blocks"))
    used = []
    monkeypatch.setattr(rtsvc.offline, "stream_file", lambda voice, src, out, knobs, config, **kw:
                        used.append(config.block_ms) or 1.0)
    src = write_wav(tmp_path / "in.wav", harmonic_tone(1.0))
    code, out, err = run_cli(["convert", src, tmp_path / "o.wav", "--stream"], capsys, monkeypatch)
    assert code == 0, err
    from rtsvc.voices.defaults import DSP_BLOCK_MS

    assert used == [DSP_BLOCK_MS]
    assert "--f0" not in out + err and "underrun" not in (out + err).lower()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_robust_f0_levels_equal_upstreams_ensembles():
    from rtsvc.features.robust_f0 import robust_f0
    from tests.upstream import robust_f0 as up

    audio = np.concatenate([harmonic_tone(1.0, 150.0, 0.3, vibrato=0.05), np.zeros(SR // 4, np.float32),
                            harmonic_tone(0.8, 240.0, 0.2)]).astype(np.float64)
    n = len(audio) // 512
    rng = np.random.default_rng(3)
    rmvpe = np.where(rng.random(n) < 0.2, 0.0, 150.0 + 5 * rng.standard_normal(n))  # gaps to fill
    rmvpe[40] = 600.0  # an octave error for the median to catch
    rms = np.abs(rng.standard_normal(n)) * 0.1
    step = 512 / SR
    world, praat = up.get_f0_pw(audio, SR, step, 40, 1100), up.get_f0_pm(audio, SR, step, 40, 1100)
    light = robust_f0(1, rmvpe, audio, SR, 512, rms)
    np.testing.assert_array_equal(light, up.f0_ensemble_light(rmvpe.copy(), world, praat, rms=rms))
    full = robust_f0(2, rmvpe, audio, SR, 512)
    np.testing.assert_allclose(full, up.f0_ensemble(rmvpe.copy(), world, praat), atol=1e-9)
    assert light.shape == full.shape == (n,)
    assert (light != rmvpe).any() and (full != rmvpe).any()  # both changed something
    assert full[40] < 400  # the outlier is gone


def test_cvec_downsample_rate_is_upstreams_for_v3_and_refused_where_it_means_nothing(
        tiny_pretrained_v3, tmp_path, capsys, monkeypatch):
    from rtsvc.pretrained import resolve_pretrained
    from rtsvc.settings import Knobs
    from rtsvc.voices.spec import VoiceSpec, open_model
    from tests.upstream.v3_head import linear_interpolate_tensor

    ckpt, _ = make_v3_head(tmp_path / "v3.ckpt")
    paths = resolve_pretrained(tiny_pretrained_v3, need=("contentvec", "vocoder"))
    voice = open_model(VoiceSpec(model=ckpt, backend="torch", device="cpu", f0="dio", streaming=False), paths)
    audio = harmonic_tone(1.0, 180.0)
    n = len(audio) // 512
    outs = {}
    for rate in (2, 4):
        voice.cvec_downsample_rate = rate
        cond, _ = voice._conditioning(audio, n, 0, 0.0)
        if rate != 2:  # upstream's extract_features: every 2nd frame, to count // rate, back to n
            ds = cond.cvec[0, ::2, :]
            ds = linear_interpolate_tensor(ds, ds.shape[0] // rate)
            want = linear_interpolate_tensor(ds, n)[None]
            torch.testing.assert_close(cond.bad_cvec, want, atol=1e-6, rtol=0)
        outs[rate] = voice.convert(audio, Knobs(steps=3))
    assert np.abs(outs[2] - outs[4]).max() > 1e-4  # the rate reaches the sound
    src = write_wav(tmp_path / "in.wav", audio)
    args = ["convert", src, tmp_path / "o.wav", "--cvec-downsample-rate"]
    code, _, err = run_cli([*args, "4"], capsys, monkeypatch)
    assert code == 2 and "--cvec-downsample-rate applies to V3 models converting offline" in err  # DSP voice
    code, _, err = run_cli([*args, "0"], capsys, monkeypatch)
    assert code == 2 and "at least 1" in err
