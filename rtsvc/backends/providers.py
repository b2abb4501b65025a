"""ONNX Runtime execution providers: which ones rtsvc knows, which start here, which a run uses.

One row per provider (`PROVIDERS`): the name users type, ONNX Runtime's name, the wheel that has
it and the hardware it runs on, so `--providers`, the automatic choice, `rtsvc doctor` and every
message read the same table. An ONNX Runtime wheel lists providers it was built with even where
they cannot run (onnxruntime-gpu lists CUDA on a machine without a GPU), so a provider counts as
usable only if a one-node probe session really starts on it (`provider_works`).

Automatic choice: every accelerator that starts here, in the table's order, then CPU (always last,
for ops an accelerator lacks). A provider named in `--providers` that cannot start is an error
naming the wheel to install; it is never dropped silently.

Only CPU, and CUDA/TensorRT on an NVIDIA machine, can be run on rtsvc's test machines: DirectML
(Windows), CoreML (macOS) and MIGraphX/ROCm (AMD on Linux) are chosen by this same code, tested
with a faked ONNX Runtime (tests/test_providers.py).
"""

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from rtsvc.errors import UserError

ORT_LOG_ERRORS_ONLY = 3
ORT_LOG_SILENT = 4


@dataclass(frozen=True)
class Provider:
    name: str  # what --providers takes
    ort: str  # ONNX Runtime's name
    wheel: str  # the pip package whose onnxruntime has it
    hardware: str  # what it runs on, in a user's words
    aliases: tuple[str, ...] = ()
    cuda_binding: bool = False  # inputs bound by CUDA pointer when torch is on CUDA (IO binding)


PROVIDERS = (
    Provider("tensorrt", "TensorrtExecutionProvider", "onnxruntime-gpu (plus TensorRT)", "NVIDIA GPU",
             ("trt",), cuda_binding=True),
    Provider("cuda", "CUDAExecutionProvider", "onnxruntime-gpu", "NVIDIA GPU", cuda_binding=True),
    Provider("migraphx", "MIGraphXExecutionProvider", "onnxruntime-migraphx", "AMD GPU on Linux (ROCm)"),
    Provider("rocm", "ROCMExecutionProvider", "onnxruntime-rocm (ONNX Runtime <= 1.22)",
             "AMD GPU on Linux (ROCm)"),
    Provider("directml", "DmlExecutionProvider", "onnxruntime-directml",
             "DirectX 12 GPU on Windows (AMD, Intel, NVIDIA)", ("dml",)),
    Provider("coreml", "CoreMLExecutionProvider", "onnxruntime (the macOS wheel)",
             "Apple GPU / Neural Engine on macOS"),
    Provider("cpu", "CPUExecutionProvider", "onnxruntime", "CPU"),
)
CPU = "CPUExecutionProvider"
BY_ORT = {p.ort: p for p in PROVIDERS}
PROVIDER_NAMES = {alias: p.ort for p in PROVIDERS for alias in (p.name, *p.aliases)}  # typed -> ORT
PROVIDER_CHOICES = tuple(p.name for p in PROVIDERS)
GPU_PROVIDERS = tuple(p.ort for p in PROVIDERS if p.cuda_binding)  # what `--device cuda` asks for
ACCELERATORS = tuple(p.ort for p in PROVIDERS if p.ort != CPU)


def _ort():
    import onnxruntime

    return onnxruntime


def _probe_model() -> bytes:
    """A one-node ONNX graph (Relu) for checking that a provider can start a session."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def listed() -> list[str]:
    """The providers the installed onnxruntime wheel was built with (not all of them start)."""
    return list(_ort().get_available_providers())


@cache
def provider_works(provider: str) -> bool:
    """True when ONNX Runtime really runs a session on `provider` (ORT silently falls back to CPU)."""
    ort = _ort()
    if provider not in ort.get_available_providers():
        return False
    if provider == CPU:
        return True
    options = ort.SessionOptions()
    options.log_severity_level = ORT_LOG_SILENT
    ort.set_default_logger_severity(ORT_LOG_SILENT)
    try:
        # ORT prints its fallback notice with print(); keep the console clean while probing
        with contextlib.redirect_stdout(io.StringIO()):
            session = ort.InferenceSession(_probe_model(), options, providers=[provider])
        return provider in session.get_providers()
    except Exception:  # any failure to start means "not usable here"
        return False
    finally:
        ort.set_default_logger_severity(ORT_LOG_ERRORS_ONLY)


def parse_providers(spec: str | Sequence[str] | None) -> list[str] | None:
    """`"cuda,cpu"` or `["dml", "cpu"]` -> ORT provider names; None or "auto" -> None (automatic).
    ORT's own names (`DmlExecutionProvider`) are taken too, in any case."""
    if spec is None:
        return None
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if not names or names == ["auto"]:
        return None
    out = []
    for name in names:
        key = name.lower()
        full = PROVIDER_NAMES.get(key) or next((p.ort for p in PROVIDERS if p.ort.lower() == key), None)
        if full is None:
            raise UserError(f"unknown ONNX Runtime provider {name!r}: use auto or a comma list of "
                            f"{', '.join(PROVIDER_CHOICES)}")
        if full not in out:
            out.append(full)
    return out


def why_not(provider: str) -> str:
    """Why a provider does not start here, in words a user can act on."""
    p = BY_ORT[provider]
    if provider not in listed():
        return (f"{p.name} ({p.hardware}) is not in the onnxruntime installed here; it comes with "
                f"{p.wheel}, installed instead of other onnxruntime wheels (README \"AMD and Mac\")")
    return (f"{p.name} is in the installed onnxruntime but cannot start a session here (no {p.hardware}, "
            "or its driver/libraries are missing)")


def choose_providers(requested: str | Sequence[str] | None = None) -> list[str]:
    """The providers to open sessions with, best first, CPU always last.

    None / "auto": every accelerator of the table that actually starts here, then CPU.
    An explicit list (e.g. "directml,cpu") is honoured in its order; a provider in it that cannot
    start here is a UserError, since the user asked for it by name.
    """
    wanted = parse_providers(requested)
    if wanted is None:
        chosen = [p for p in ACCELERATORS if provider_works(p)]
    else:
        broken = [p for p in wanted if not provider_works(p)]
        if broken:
            raise UserError(f"ONNX Runtime provider {short_name(broken[0])} was asked for but cannot start: "
                            f"{why_not(broken[0])}; try --providers cpu")
        chosen = list(wanted)
    if CPU not in chosen:
        chosen.append(CPU)  # ops an accelerator lacks run on CPU
    return chosen


def short_name(provider: str) -> str:
    """`CUDAExecutionProvider` -> `cuda`."""
    return BY_ORT[provider].name if provider in BY_ORT else provider


def provider_report() -> list[tuple[str, bool, bool]]:
    """(name, listed by onnxruntime, actually starts) for each known provider: for `rtsvc doctor`."""
    names = set(listed())
    return [(p.name, p.ort in names, provider_works(p.ort)) for p in PROVIDERS]
