"""The pretrained directory: where each feature/vocoder component lives, and how to fetch it.

The default layout is RIFT-SVC's own `pretrained/` folder, so existing users can point at theirs:

    pretrained/
      content-vec-best/                                   transformers HuBERT (+ final_proj)
      whisper-large-v3/                                   transformers Whisper (encoder used)
      nsf_hifigan_44.1k_hop512_128bin_2024.02/model.ckpt  openvpi vocoder (+ config.json beside it)
      rmvpe/model.pt                                      RMVPE state dict

Every component can be overridden on its own by a local path or (for the two transformers models)
a hub id such as `openai/whisper-large-v3`. Whisper is needed by V2 models only
(`FAMILY_COMPONENTS`): a folder without it is complete for V3.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rtsvc.errors import UserError

DEFAULT_PRETRAINED_DIR = "pretrained"
COMPONENTS = ("contentvec", "whisper", "vocoder", "rmvpe")
# what each model family needs (rmvpe only with --f0 rmvpe, the default): V3 takes no Whisper
FAMILY_COMPONENTS = {"v2": COMPONENTS, "v3": ("contentvec", "vocoder", "rmvpe")}

# relative location of each component inside a pretrained dir (upstream layout)
LAYOUT = {
    "contentvec": "content-vec-best",
    "whisper": "whisper-large-v3",
    "vocoder": "nsf_hifigan_44.1k_hop512_128bin_2024.02/model.ckpt",
    "rmvpe": "rmvpe/model.pt",
}
OPTION = {  # the CLI option that overrides each component (named in error messages)
    "contentvec": "--contentvec",
    "whisper": "--whisper",
    "vocoder": "--vocoder",
    "rmvpe": "--rmvpe",
}
# where `rtsvc download` fetches from (upstream pretrained/download.py + the Whisper release)
MODULES_REPO = "Pur1zumu/RIFT-SVC-modules"  # ContentVec, NSF-HiFiGAN, RMVPE in the upstream layout
MODULE_DIRS = {"contentvec": "content-vec-best", "vocoder": "nsf_hifigan_44.1k_hop512_128bin_2024.02",
               "rmvpe": "rmvpe"}
WHISPER_HUB_ID = "openai/whisper-large-v3"
WHISPER_FILES = ("config.json", "preprocessor_config.json", "model.safetensors")
VOICES_REPO = "Pur1zumu/RIFT-SVC-pretrained"  # the published pretrained voice checkpoints
VOICE_CHECKPOINTS = {  # --voice NAME -> file (upstream README); saved as PRETRAINED_DIR/FILE
    "pretrain-v2": "pretrain-v2-final_dit-768-12_300000steps-lr0.0003.ckpt",
    "pretrain-v3-512-8": "pretrain-v3_dit-512-8.ckpt",
    "pretrain-v3-768-12": "pretrain-v3_dit-768-12.ckpt",
    "pretrain-v3-1024-16": "pretrain-v3_dit-1024-16.ckpt",
}
DEFAULT_VOICES = ("pretrain-v2",)


@dataclass(frozen=True)
class PretrainedPaths:
    """Resolved location of each component: a local path, a hub id (transformers models), or None."""

    contentvec: str | None = None
    whisper: str | None = None
    vocoder: str | None = None
    rmvpe: str | None = None


def _looks_like_hub_id(value: str) -> bool:
    """`owner/name` that is not an existing path: let transformers resolve it (cache or hub)."""
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith((".", "~")) and not Path(value).exists()


def _component_ok(name: str, path: Path) -> bool:
    if name in ("contentvec", "whisper"):
        return (path / "config.json").is_file()
    if name == "vocoder":
        return path.is_file() and (path.parent / "config.json").is_file()
    return path.is_file()


def _missing_message(name: str, where: str, pretrained_dir: Path | None) -> str:
    # the usual cause: the components are in another folder and --pretrained-dir was left out
    fetch = (f"pass --pretrained-dir FOLDER (where `rtsvc download` put them), run `rtsvc download --to "
             f"{pretrained_dir or DEFAULT_PRETRAINED_DIR}`")
    what = {
        "contentvec": "ContentVec (a folder with config.json)",
        "whisper": "Whisper encoder (a folder with config.json)",
        "vocoder": "NSF-HiFiGAN vocoder (model.ckpt with config.json beside it)",
        "rmvpe": "RMVPE F0 model (model.pt)",
    }[name]
    if name == "rmvpe":  # FCPE ships inside the torchfcpe package: nothing to download
        return f"{what} not found at {where}: {fetch}, point --rmvpe at it, or use --f0 fcpe (no download)"
    return f"{what} not found at {where}: {fetch}, or point {OPTION[name]} at it"


def resolve_pretrained(
    pretrained_dir: str | Path | None = DEFAULT_PRETRAINED_DIR,
    contentvec: str | Path | None = None,
    whisper: str | Path | None = None,
    vocoder: str | Path | None = None,
    rmvpe: str | Path | None = None,
    need: tuple[str, ...] = COMPONENTS,
) -> PretrainedPaths:
    """Find each needed component (its override, else the pretrained dir); UserError names a missing one."""
    overrides = {"contentvec": contentvec, "whisper": whisper, "vocoder": vocoder, "rmvpe": rmvpe}
    root = Path(pretrained_dir) if pretrained_dir is not None else None
    found: dict[str, str | None] = {}
    for name in COMPONENTS:
        given = overrides[name]
        if given is not None:
            value = str(given)
            if name in ("contentvec", "whisper") and _looks_like_hub_id(value):
                found[name] = value
                continue
            path = Path(value).expanduser()
            if name == "vocoder" and path.is_dir():
                path = path / "model.ckpt"
            if not _component_ok(name, path):
                if name in need:
                    raise UserError(_missing_message(name, str(path), root))
                found[name] = None
                continue
            found[name] = str(path)
            continue
        path = root / LAYOUT[name] if root is not None else None
        if path is not None and _component_ok(name, path):
            found[name] = str(path)
        elif name in need:
            where = str(path) if path is not None else "(no --pretrained-dir given)"
            raise UserError(_missing_message(name, where, root))
        else:
            found[name] = None
    return PretrainedPaths(**found)


def components_for(family: str) -> tuple[str, ...]:
    """The components a model family needs: "v2", "v3", or "all" (both)."""
    if family == "all":
        return COMPONENTS
    if family not in FAMILY_COMPONENTS:
        raise UserError(f"unknown model family {family!r}: use v2, v3 or all")
    return FAMILY_COMPONENTS[family]


@dataclass(frozen=True)
class DownloadItem:
    """One hub fetch of `rtsvc download`: which repository, which files, into which folder."""

    label: str
    repo: str
    files: tuple[str, ...]  # file names or glob patterns inside the repository
    local_dir: Path

    def describe(self) -> str:
        return f"{self.repo} ({', '.join(self.files)})"


def download_plan(to: str | Path = DEFAULT_PRETRAINED_DIR, components: tuple[str, ...] = COMPONENTS,
                  voices: tuple[str, ...] = DEFAULT_VOICES) -> list[DownloadItem]:
    """What `rtsvc download` fetches, in order; UserError for an unknown voice name."""
    unknown = [v for v in voices if v not in VOICE_CHECKPOINTS]
    if unknown:
        raise UserError(f"unknown --voice {unknown[0]!r}: use {', '.join(VOICE_CHECKPOINTS)} or none")
    to = Path(to)
    names = {"contentvec": "ContentVec", "vocoder": "NSF-HiFiGAN vocoder", "rmvpe": "RMVPE"}
    plan = [DownloadItem(names[c], MODULES_REPO, (f"{MODULE_DIRS[c]}/*",), to)
            for c in ("contentvec", "vocoder", "rmvpe") if c in components]
    if "whisper" in components:
        plan.append(DownloadItem("Whisper large-v3 encoder", WHISPER_HUB_ID, WHISPER_FILES,
                                 to / LAYOUT["whisper"]))
    plan += [DownloadItem(f"voice checkpoint {v}", VOICES_REPO, (VOICE_CHECKPOINTS[v],), to) for v in voices]
    return plan


def download_pretrained(to: str | Path = DEFAULT_PRETRAINED_DIR, components: tuple[str, ...] = COMPONENTS,
                        voices: tuple[str, ...] = DEFAULT_VOICES,
                        on_step: Callable[[int, int, DownloadItem], None] | None = None) -> Path:
    """Fetch the components and voice checkpoints from the model hub into the upstream layout under
    `to`; `on_step(i, n, item)` before each fetch (huggingface_hub draws per-file progress bars).
    Offline or failing, the UserError names every repository and file needed, to copy by hand."""
    plan = download_plan(to, components, voices)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError("huggingface_hub is not installed: pip install huggingface_hub") from None
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    for i, item in enumerate(plan):
        if on_step is not None:
            on_step(i, len(plan), item)
        try:
            snapshot_download(repo_id=item.repo, allow_patterns=list(item.files),
                              local_dir=str(item.local_dir))
        except Exception as err:  # offline, auth, disk full: all end the same way for the user
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            needed = "; ".join(f"{x.describe()} -> {x.local_dir}" for x in plan[i:])
            raise UserError(f"download of {item.label} from the Hugging Face hub failed ({reason}); "
                            f"still needed: {needed}") from None
    return to
