"""ONNX Runtime providers of other vendors (DirectML, CoreML, MIGraphX, ROCm): their names, the
automatic order, the fall back to CPU when one does not start, and the messages when a named one is
missing. This machine has none of them: ONNX Runtime is faked to list and start them (the sessions
themselves run on the real CPU provider), so what is tested is rtsvc's choice, not the vendors'
runtimes."""

from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest

from rtsvc import doctor
from rtsvc.backends import providers as p
from rtsvc.backends.onnx_backend import OnnxBackend, session_options
from rtsvc.errors import UserError

CPU, DML, COREML = "CPUExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider"
ROCM, MIGRAPHX = "ROCMExecutionProvider", "MIGraphXExecutionProvider"
TRT, CUDA = "TensorrtExecutionProvider", "CUDAExecutionProvider"


class _Claimed:
    """A real CPU session that reports the accelerator it was asked for (as ORT would on that machine)."""

    def __init__(self, session, provider):
        self._session, self._provider = session, provider

    def get_providers(self):
        return [self._provider, CPU]

    def __getattr__(self, name):
        return getattr(self._session, name)


@pytest.fixture
def fake_ort(monkeypatch):
    """`machine.listed`: what the wheel lists; `machine.starts`: what starts a session at all;
    `machine.graph_fails`: what starts the one-node probe but fails on a real graph file."""
    machine = SimpleNamespace(listed=[CPU], starts=set(), graph_fails=set(), opened=[])
    real = ort.InferenceSession

    def session(model, options=None, providers=None, **kw):
        names = [x if isinstance(x, str) else x[0] for x in providers]
        machine.opened.append(names)
        first = names[0]
        if first == CPU:
            return real(model, options, providers=[CPU])
        if first not in machine.listed or first not in machine.starts:
            raise RuntimeError(f"{first}: no device")
        if isinstance(model, str) and first in machine.graph_fails:
            raise RuntimeError(f"{first}: unsupported operator in this graph")
        return _Claimed(real(model, options, providers=[CPU]), first)

    monkeypatch.setattr(ort, "get_available_providers", lambda: list(machine.listed))
    monkeypatch.setattr(ort, "InferenceSession", session)
    p.provider_works.cache_clear()
    yield machine
    p.provider_works.cache_clear()


def test_names_accepted_in_any_spelling_once_each():
    assert p.parse_providers("dml, CoreML ,rocm,MIGraphX,DirectML,cpu") == [DML, COREML, ROCM, MIGRAPHX, CPU]
    assert p.parse_providers(["DmlExecutionProvider", "coreml"]) == [DML, COREML]
    assert p.parse_providers(" auto ") is None
    with pytest.raises(UserError) as err:
        p.parse_providers("vulkan")
    assert str(err.value) == ("unknown ONNX Runtime provider 'vulkan': use auto or a comma list of tensorrt, "
                              "cuda, migraphx, rocm, directml, coreml, cpu")


def test_automatic_order_puts_every_accelerator_that_starts_before_cpu(fake_ort):
    fake_ort.listed = [TRT, CUDA, MIGRAPHX, ROCM, DML, COREML, CPU]
    fake_ort.starts = set(fake_ort.listed)
    assert p.choose_providers() == [TRT, CUDA, MIGRAPHX, ROCM, DML, COREML, CPU]
    p.provider_works.cache_clear()
    fake_ort.listed, fake_ort.starts = [COREML, CPU], {COREML}  # a Mac
    assert p.choose_providers() == [COREML, CPU]
    assert p.choose_providers("coreml") == [COREML, CPU]  # CPU always last, for ops CoreML lacks
    assert p.choose_providers("cpu,coreml") == [CPU, COREML]  # a named order is kept


def test_a_listed_provider_that_does_not_start_leaves_cpu(fake_ort):
    fake_ort.listed = [DML, CPU]  # onnxruntime-directml on a Windows machine without a DirectX 12 GPU
    assert p.choose_providers() == [CPU]
    report = {name: (listed, works) for name, listed, works in p.provider_report()}
    assert report["directml"] == (True, False) and report["coreml"] == (False, False)
    assert report["cpu"] == (True, True)


@pytest.mark.parametrize("name, listed, message", [
    ("dml", [CPU], "provider directml was asked for but cannot start: directml (DirectX 12 GPU on Windows "
     "(AMD, Intel, NVIDIA)) is not in the onnxruntime installed here; it comes with onnxruntime-directml"),
    ("coreml", [CPU], "it comes with onnxruntime (the macOS wheel)"),
    ("migraphx", [CPU], "it comes with onnxruntime-migraphx"),
    ("rocm", [CPU], "it comes with onnxruntime-rocm (ONNX Runtime <= 1.22)"),
    ("dml", [DML, CPU], "directml is in the installed onnxruntime but cannot start a session here (no "
     "DirectX 12 GPU on Windows (AMD, Intel, NVIDIA), or its driver/libraries are missing); try "
     "--providers cpu"),
])
def test_a_named_provider_that_is_missing_says_what_to_install(fake_ort, name, listed, message):
    fake_ort.listed = listed
    with pytest.raises(UserError) as err:
        p.choose_providers(f"{name},cpu")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_directml_sessions_turn_memory_patterns_off():
    assert session_options(None, [DML, CPU]).enable_mem_pattern is False
    assert session_options(None, [CPU]).enable_mem_pattern is True


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_pretrained):
    """A tiny bundle exported from a .safetensors voice (export reads those as it reads checkpoints)."""
    from rtsvc.export.onnx_export import export_bundle
    from rtsvc.export.safetensors_export import export_safetensors

    from tests.tiny_models import make_tiny_dit_checkpoint

    root = tmp_path_factory.mktemp("providers")
    voice, _ = export_safetensors(make_tiny_dit_checkpoint(root / "v.ckpt"), root / "v.safetensors")
    return export_bundle(voice, root / "v.rtsvc", pretrained_dir=tiny_pretrained, lengths=(17,)).path


def test_an_accelerator_that_fails_on_the_graphs_falls_back_to_cpu_and_says_so(fake_ort, bundle):
    from rtsvc.voices.spec import describe_voice

    fake_ort.listed, fake_ort.starts, fake_ort.graph_fails = [DML, CPU], {DML}, {DML}
    backend = OnnxBackend.open(bundle)  # automatic: DirectML starts the probe, fails on dit.onnx
    assert backend.providers == [CPU] and [DML, CPU] in fake_ort.opened
    assert backend.fallback.startswith("directml failed (ONNX Runtime cannot load ")
    line = describe_voice(SimpleNamespace(backend=backend, speakers=list(backend.speakers)), bundle)
    assert line.endswith("; ONNX Runtime on cpu (" + backend.fallback + ")")
    with pytest.raises(UserError, match="DmlExecutionProvider: unsupported operator"):
        OnnxBackend.open(bundle, providers="dml,cpu")  # named: an error, never a silent fallback
    p.provider_works.cache_clear()
    fake_ort.listed, fake_ort.starts = [MIGRAPHX, DML, CPU], {MIGRAPHX, DML}
    fake_ort.graph_fails = {MIGRAPHX}
    backend = OnnxBackend.open(bundle)  # the next accelerator, not straight to CPU
    assert backend.providers == [DML, CPU] and backend.fallback.startswith("migraphx failed (")
    assert backend.fallback.endswith("; running on directml")


def test_an_accelerator_that_starts_runs_the_bundle(fake_ort, bundle):
    import torch

    fake_ort.listed, fake_ort.starts = [DML, CPU], {DML}
    backend = OnnxBackend.open(bundle)
    assert backend.providers == [DML, CPU] and backend.fallback is None and not backend.io_binding
    audio = backend.vocode(torch.randn(1, 128, 20) - 5, torch.full((1, 20), 150.0), torch.zeros(1, 9),
                           torch.randn(1, 20 * 512, 9))
    assert audio.shape == (1, 20 * 512) and np.isfinite(audio.numpy()).all()


def test_doctor_names_other_vendors_providers(fake_ort, monkeypatch):
    monkeypatch.setattr(doctor, "_nvidia_gpu_present", lambda: False)
    monkeypatch.setattr(doctor, "_installed", lambda name: name == "onnxruntime")
    rows = {row.name: row for row in doctor._onnx_providers()}
    absent = rows["migraphx, rocm, directml, coreml"]
    assert absent.ok is None and "onnxruntime-directml (Windows)" in absent.value
    assert "onnxruntime-migraphx (Linux)" in absent.value and "CoreML" in absent.value
    p.provider_works.cache_clear()
    fake_ort.listed, fake_ort.starts = [DML, COREML, CPU], {DML}
    rows = {row.name: row for row in doctor._onnx_providers()}
    assert rows["directml"].value == "usable (a session starts)" and rows["directml"].ok is True
    assert rows["coreml"].value == ("in the installed onnxruntime but cannot start here (needs a Apple GPU / "
                                    "Neural Engine on macOS and its driver)")
    assert rows["coreml"].ok is None and "migraphx, rocm" in rows
