"""Issue 14: per-stage cost. Auto block by measurement, the bench's stage breakdown, int8 bundles,
and ONNX graphs that take fewer inputs than the backend offers (one-evaluation students)."""

import time

import numpy as np
import pytest
import torch
from rtsvc.export.onnx_export import export_vocoder
from rtsvc.export.quantize import quantize_bundle

from rtsvc.autoblock import P99_MARGIN, frames_to_ms, pick_block, resolve_block
from rtsvc.backends.bundle import read_bundle, write_manifest
from rtsvc.backends.onnx_backend import CPU, OnnxBackend
from rtsvc.bench.blocks import BenchCase, bench_case
from rtsvc.dsp.audio import HOP_LENGTH, SAMPLE_RATE
from rtsvc.engine import StreamConfig
from rtsvc.errors import UserError
from rtsvc.models.flow import Conditioning, cfg_velocity
from rtsvc.models.guidance import Guidance
from rtsvc.models.loading import load_dit, load_vocoder
from rtsvc.pretrained import resolve_pretrained
from rtsvc.settings import Knobs
from rtsvc.voices.defaults import MODEL_STREAM
from rtsvc.voices.spec import VoiceSpec, open_model
from tests.cli_helpers import run_cli
from tests.tiny_models import make_tiny_dit_checkpoint


class SleepyVoice:
    """A voice whose compute per block is known: 0.95 of the block below 100 ms, 0.3 above."""

    sample_rate = SAMPLE_RATE
    stream_defaults = MODEL_STREAM
    speakers = ["x"]

    def __init__(self, slow_below_ms: float = 100.0, slow: float = 0.95, fast: float = 0.3):
        self.slow_below_ms, self.slow, self.fast = slow_below_ms, slow, fast
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1

    def convert(self, audio, knobs, start_sample=0, tail=None):
        block_ms = (tail - 1544) * 1000.0 / SAMPLE_RATE  # tail = block + 25 ms crossfade + 10 ms search
        time.sleep(block_ms / 1000.0 * (self.slow if block_ms < self.slow_below_ms else self.fast))
        return np.zeros(tail, dtype=np.float32)


def test_auto_block_picks_the_shortest_block_that_fits_the_margin():
    voice = SleepyVoice()
    choice = pick_block(voice, StreamConfig(), Knobs())
    assert choice.block_ms == pytest.approx(frames_to_ms(9, SAMPLE_RATE))  # 104.5 ms: 69.7 is at 0.95
    blocks = [b for b, _, _ in choice.measured]
    assert blocks == pytest.approx([frames_to_ms(f, SAMPLE_RATE) for f in (6, 9, 13)])  # down from 150.9
    p99 = {round(b, 1): p for b, p, _ in choice.measured}
    assert p99[104.5] <= P99_MARGIN * 104.5 and p99[69.7] > P99_MARGIN * 69.7
    assert choice.fits and choice.summary().startswith("auto block: 104.5 ms (measured here: p99 compute")
    assert voice.resets >= 3  # every candidate starts from a fresh stream


def test_auto_block_walks_up_and_says_when_nothing_fits():
    slow = SleepyVoice(slow_below_ms=10_000.0, slow=0.9)  # 0.9 of every block: never within 0.7
    choice = pick_block(slow, StreamConfig(), Knobs(), candidates=(9, 13, 18), blocks=3)
    assert not choice.fits and choice.block_ms == pytest.approx(frames_to_ms(18, SAMPLE_RATE))
    assert "no candidate fits the margin" in choice.summary()
    said = []
    config = resolve_block(SleepyVoice(), StreamConfig(block_ms=200.0), Knobs(), say=said.append)
    assert config.block_ms == 200.0 and said == []  # a given block is never measured


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_pretrained):
    root = tmp_path_factory.mktemp("cpu_cost")
    ckpt = make_tiny_dit_checkpoint(root / "tiny.ckpt")
    return root, ckpt, tiny_pretrained


def test_bench_breaks_a_model_block_into_stages(tiny):
    _, ckpt, pretrained = tiny
    paths = resolve_pretrained(pretrained, need=("contentvec", "whisper", "vocoder"))
    voice = open_model(VoiceSpec(model=ckpt, backend="torch", device="cpu", f0="dio"), paths)
    row = bench_case(BenchCase("tiny", "cpu", voice, StreamConfig(block_ms=150.0).for_voice(voice), 2), 1.0)
    stages = row["stages"]
    for stage in ("f0", "contentvec", "whisper", "dit", "vocoder"):
        assert stages[stage] > 0.0, stage
    parts = sum(stages[k] for k in ("f0", "contentvec", "whisper", "dit", "vocoder", "resample+rms"))
    assert parts <= stages["voice"] + 1e-6  # the voice's parts fit inside its measured time
    assert stages["voice"] + stages["engine"] == pytest.approx(row["mean_ms"], rel=1e-6)


@pytest.mark.slow
def test_int8_export_writes_a_quantized_bundle_with_parity(tiny, capsys, monkeypatch):
    root, ckpt, pretrained = tiny
    out = root / "tiny-int8.rtsvc"
    code, printed, err = run_cli(["export", ckpt, "--out", out, "--pretrained-dir", pretrained, "--int8"],
                                 capsys, monkeypatch)
    assert code == 0, printed + err
    assert "int8 vs fp32" in printed and "speed-up" in printed  # the parity table, on stdout
    assert "quantized" in err and "to int8" in err
    bundle = read_bundle(out)  # hashes re-written: the bundle verifies
    rows = {r["graph"]: r for r in bundle.manifest["export"]["int8"]}
    assert bundle.manifest["export"]["precision"] == "int8" and set(rows) == {"dit.onnx", "vocoder.onnx"}
    for row in rows.values():
        assert 0.0 <= row["rel_l2"] < 0.1, row  # int8 stays close to fp32 on the parity inputs
        assert row["scheme"] == "fp32" if row["kept_fp32"] else row["scheme"].endswith(")")
    backend = OnnxBackend(bundle, [CPU], torch.device("cpu"))
    dit = load_dit(ckpt, "cpu").model
    g = torch.Generator().manual_seed(0)
    n = 30
    cond = Conditioning(torch.tensor([0]), 150 + 50 * torch.rand(1, n, generator=g),
                        0.1 * torch.rand(1, n, generator=g), torch.randn(1, n, 768, generator=g),
                        torch.randn(1, n, 1280, generator=g))
    x, t = torch.randn(1, n, 128, generator=g), torch.tensor([0.5])
    with torch.no_grad():
        ref = cfg_velocity(dit, x, t, cond, 2.0)
    got = backend.guided_velocity(x, t, cond, Guidance(cfg_strength=2.0))
    assert float((got - ref).norm() / ref.norm()) < 0.1
    # quantizing twice is a user mistake, one line
    with pytest.raises(UserError, match="only an fp32 bundle can be quantized"):
        quantize_bundle(out)


def test_dynamic_int8_dit_runs_as_its_exact_integer_arithmetic(tiny, tmp_path):
    """ONNX Runtime's int8 GEMM on x86 without VNNI (AVX2) sums u8 x s8 pairs in saturating int16;
    with full 8-bit weights that tripled the DiT's int8 error on such a CPU (0.106 vs 0.042). The
    int8 graph must compute what its integers say: ORT's output vs the ONNX reference evaluator's
    exact integer arithmetic, on whatever CPU runs the test."""
    import onnx
    from onnx.reference import ReferenceEvaluator
    from rtsvc.export.onnx_export import export_dit
    from rtsvc.export.quantize import dit_feeds, quantize_dynamic_graph

    from rtsvc.backends.onnx_backend import make_session

    _, ckpt, _ = tiny
    fp32, int8 = tmp_path / "dit.onnx", tmp_path / "dit.int8.onnx"
    export_dit(load_dit(ckpt, "cpu").model, fp32)
    quantize_dynamic_graph(fp32, int8)
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(int8)).graph.node}
    session, exact = make_session(int8, threads=1), ReferenceEvaluator(str(int8))
    for feed in dit_feeds(fp32, 2, [], count=2):
        got, want = session.run(None, feed)[0], exact.run(None, feed)[0]
        assert float(np.linalg.norm(got - want) / np.linalg.norm(want)) < 0.01


def test_int8_and_fp16_together_is_refused(tiny, capsys, monkeypatch):
    root, ckpt, pretrained = tiny
    code, printed, err = run_cli(["export", ckpt, "--out", root / "x.rtsvc", "--fp16", "--int8"],
                                 capsys, monkeypatch)
    assert code == 2 and "--int8 quantizes an fp32 export: drop --fp16" in printed + err
    assert not (root / "x.rtsvc").exists()  # refused before exporting anything


class NullWhisperBranch(torch.nn.Module):
    """A DiT graph with fewer inputs than the interface offers: the null-Whisper branch only (what
    cfg 0 computes), so it has no whisper or cfg_strength input."""

    def __init__(self, dit):
        super().__init__()
        self.dit = dit

    def forward(self, x, t, spk, f0, rms, cvec):
        whisper = cvec.new_zeros(cvec.shape[0], cvec.shape[1], self.dit.config.whisper_dim)
        drop = t > -1.0  # all True, as a traced bool tensor [b]
        return self.dit(x, spk, f0, rms, cvec, whisper, t, drop_whisper=drop)


def export_null_branch(dit, path) -> None:
    from rtsvc.export.graphs import dit_example
    from rtsvc.export.onnx_export import _export

    example = dit_example(2, 40, dit.config.num_speaker, torch.Generator().manual_seed(0))[:6]
    per_frame = {0: "batch", 1: "frames"}
    axes = {"x": per_frame, "t": {0: "batch"}, "spk": {0: "batch"}, "f0": per_frame, "rms": per_frame,
            "cvec": per_frame, "velocity": per_frame}
    _export(NullWhisperBranch(dit).eval(), example, path, ("x", "t", "spk", "f0", "rms", "cvec"), "velocity",
            axes, 17)


def test_onnx_backend_runs_a_dit_graph_without_guidance_inputs(tiny, tmp_path):
    """A one-evaluation graph (no whisper, no cfg_strength input): the backend feeds what it takes,
    and the result is the DiT's null-Whisper branch, which is what cfg 0 computes."""
    _, ckpt, pretrained = tiny
    dit = load_dit(ckpt, "cpu").model
    bundle = tmp_path / "student.rtsvc"
    bundle.mkdir()
    export_null_branch(dit, bundle / "dit.onnx")
    paths = resolve_pretrained(pretrained, need=("vocoder",))
    export_vocoder(load_vocoder(paths.vocoder, "cpu"), bundle / "vocoder.onnx")
    write_manifest(bundle, {"audio": {"sample_rate": SAMPLE_RATE, "hop_length": HOP_LENGTH},
                            "speakers": {"a": 0, "b": 1}, "dit": {}, "defaults": {}, "features": {}})
    backend = OnnxBackend(read_bundle(bundle), [CPU], torch.device("cpu"))
    assert {i.name for i in backend.dit.get_inputs()} == {"x", "t", "spk", "f0", "rms", "cvec"}
    g = torch.Generator().manual_seed(1)
    n = 24
    cond = Conditioning(torch.tensor([1]), 200 * torch.ones(1, n), 0.1 * torch.rand(1, n, generator=g),
                        torch.randn(1, n, 768, generator=g), torch.randn(1, n, 1280, generator=g))
    x, t = torch.randn(1, n, 128, generator=g), torch.tensor([0.3])
    got = backend.guided_velocity(x, t, cond, Guidance(cfg_strength=2.0))  # whisper, cfg: offered, not taken
    ref = cfg_velocity(dit, x, t, cond, 0.0)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(NullWhisperBranch(dit)(x, t, cond.spk, cond.f0, cond.rms, cond.cvec), ref,
                               atol=1e-5, rtol=1e-5)
