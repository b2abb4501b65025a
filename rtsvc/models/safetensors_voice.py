"""`.safetensors` voices: a RIFT-SVC DiT that people can share without pickle.

One file: the DiT's tensors under their state-dict names (`spk_embed.weight`, ...; no
`model.transformer.` prefix) and, in safetensors' own string metadata under the key `rtsvc`, one
small JSON object (docs/bundle.md, "Shared voices"):

    {"format": "rtsvc-voice", "format_version": 1, "family": "v3",
     "cfg": {"model": {...}, "spk2idx": {"alice": 0}, "default_speaker": "alice",
             "dataset": {"sample_rate": 44100, ...}, "training": {"lora_alpha": 8.0},
             "student": {...}}}

`cfg` is the part of a checkpoint's `hyper_parameters.cfg` that `load_dit` reads, in the same
layout, so the same code reads both. Reading never unpickles anything: the header is JSON and the
tensors raw bytes (the safetensors library checks their offsets against the file). Everything in
the metadata is checked before any tensor is read or any network is built: its types and sizes,
and the sizes it claims against the tensors' shapes (on a skeleton on the meta device, which holds
no memory), so a stranger's file either loads or is refused with one line.
"""

import json
import math
from pathlib import Path
from typing import Any

import torch

from rtsvc.errors import UserError
from rtsvc.models.families import Family, family_of_state
from rtsvc.models.lora import lora_rank_of
from rtsvc.models.student import STUDENT_KEY, StudentInfo, make_student

SUFFIX = ".safetensors"
METADATA_KEY = "rtsvc"  # the safetensors `__metadata__` entry holding the JSON
FORMAT = "rtsvc-voice"
FORMAT_VERSION = 1
MAX_METADATA_BYTES = 1 << 20  # real ones are ~1 kB (+ ~20 bytes per speaker)
MAX_JSON_DEPTH = 8  # {"cfg": {"student": {"guidance": {"cfg_skip_layers": [...]}}}} is 5
MAX_SPEAKERS = 100_000
MAX_TENSORS = 100_000  # a V3 1024-16 DiT has ~400
MAX_NAME_CHARS = 200
MAX_DATASET_VALUE = 10_000_000
# the tensor types a DiT file may hold: floats only
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
CFG_KEYS = {"model", "spk2idx", "default_speaker", "dataset", "training", "student"}
TOP_KEYS = {"format", "format_version", "family", "cfg", "source"}


def is_safetensors(path: str | Path) -> bool:
    """A `.safetensors` voice is told by its suffix (what `--model` dispatches on)."""
    return Path(path).suffix.lower() == SUFFIX


def _refuse(path: Path, why: str) -> UserError:
    return UserError(f"{path}: not a usable rtsvc voice: {why}")


def _open(path: Path):
    """The file's safetensors handle (header parsed, no tensor read); one line for anything else."""
    if not path.exists():
        raise UserError(f"model not found: {path}")
    if not path.is_file():
        raise UserError(f"refusing to read model {path}: not a regular file")
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # noqa: BLE001 - the library raises its own error for every bad header
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path} is not a valid safetensors file ({first})") from None


def _depth(obj: Any, level: int = 0) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(obj, dict):
        return max((_depth(v, level + 1) for v in obj.values()), default=level + 1)
    if isinstance(obj, list):
        return max((_depth(v, level + 1) for v in obj), default=level + 1)
    return level


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _name_ok(name: Any) -> bool:
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS and name.isprintable()


def read_metadata(path: Path, metadata: dict[str, str] | None) -> dict:
    """The `rtsvc` JSON of a safetensors header, checked for shape and types (not yet against the
    tensors): the top-level object and its `cfg` as this rtsvc writes them."""
    text = (metadata or {}).get(METADATA_KEY)
    if text is None:
        raise _refuse(path, f"its metadata has no '{METADATA_KEY}' entry (the config and speakers); "
                      "a bare state dict needs `rtsvc export --format safetensors` from its .ckpt")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_METADATA_BYTES:
        raise _refuse(path, f"its '{METADATA_KEY}' metadata is over {MAX_METADATA_BYTES >> 10} KiB")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise _refuse(path, f"its '{METADATA_KEY}' metadata is not valid JSON ({str(err)[:80]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _refuse(path, f"its '{METADATA_KEY}' metadata is not an object with \"format\": \"{FORMAT}\"")
    if _depth(meta) > MAX_JSON_DEPTH:
        raise _refuse(path, f"its metadata nests deeper than {MAX_JSON_DEPTH}")
    version = meta.get("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        newer = "; a newer rtsvc wrote it" if type(version) is int and version > FORMAT_VERSION else ""
        raise _refuse(path, f"unknown format_version {str(version)[:20]!r} (this rtsvc reads "
                      f"{FORMAT_VERSION}){newer}")
    extra = sorted(set(meta) - TOP_KEYS)
    if extra:
        raise _refuse(path, f"unknown metadata key(s) {', '.join(repr(k[:40]) for k in extra[:3])}")
    if not isinstance(meta.get("family"), str):
        raise _refuse(path, "its metadata has no \"family\" (v2, v3)")
    cfg = meta.get("cfg")
    if not isinstance(cfg, dict):
        raise _refuse(path, "its metadata has no \"cfg\" object")
    extra = sorted(set(cfg) - CFG_KEYS)
    if extra:
        raise _refuse(path, f"unknown cfg key(s) {', '.join(repr(k[:40]) for k in extra[:3])}")
    _check_cfg(path, cfg)
    return meta


def _check_cfg(path: Path, cfg: dict) -> None:
    """Types and sizes of every cfg field loading reads (model sizes: `families.check_sizes`,
    called by the family's `read_config` in `check_against_tensors`)."""
    if not isinstance(cfg.get("model"), dict):
        raise _refuse(path, "cfg.model (the model size) is missing")
    speakers = cfg.get("spk2idx")
    if not isinstance(speakers, dict) or not 0 < len(speakers) <= MAX_SPEAKERS:
        raise _refuse(path, f"cfg.spk2idx must map 1 to {MAX_SPEAKERS} speaker names to indices")
    for name, index in speakers.items():
        if not _name_ok(name) or type(index) is not int or index < 0:
            raise _refuse(path, f"cfg.spk2idx has {str(name)[:40]!r}: {index!r}; names are printable text of "
                          f"1-{MAX_NAME_CHARS} characters, indices whole numbers >= 0")
    default = cfg.get("default_speaker")
    if default is not None and not (isinstance(default, str) and default in speakers):
        raise _refuse(path, "cfg.default_speaker is not one of cfg.spk2idx")
    dataset = cfg.get("dataset", {})
    if not isinstance(dataset, dict) or len(dataset) > 64 or not all(
            _name_ok(k) and _finite_number(v) and 0 <= v <= MAX_DATASET_VALUE for k, v in dataset.items()):
        raise _refuse(path, f"cfg.dataset must be an object of at most 64 numbers in 0-{MAX_DATASET_VALUE}")
    training = cfg.get("training", {})
    if not isinstance(training, dict) or set(training) - {"lora_alpha"}:
        raise _refuse(path, "cfg.training may hold lora_alpha only")
    alpha = training.get("lora_alpha", 1.0)
    if not (_finite_number(alpha) and alpha > 0):
        raise _refuse(path, "cfg.training.lora_alpha must be a positive number")
    if STUDENT_KEY in cfg:
        _check_student(path, cfg[STUDENT_KEY])


def _check_student(path: Path, marker: Any) -> None:
    if not isinstance(marker, dict):
        raise _refuse(path, "cfg.student must be an object")
    nfe, grid = marker.get("nfe"), marker.get("grid")
    if type(nfe) is not int or not 1 <= nfe <= 64:
        raise _refuse(path, "cfg.student.nfe must be a whole number in 1-64")
    if not isinstance(grid, list) or len(grid) != nfe + 1 or not all(
            _finite_number(t) and 0 <= t <= 1 for t in grid):
        raise _refuse(path, "cfg.student.grid must be nfe + 1 times in 0-1")
    points = marker.get("teacher_points", 32)
    if type(points) is not int or not 2 <= points <= 10_000:
        raise _refuse(path, "cfg.student.teacher_points must be a whole number in 2-10000")
    guidance = marker.get("guidance", {})
    if not isinstance(guidance, dict) or not all(
            isinstance(k, str) and (_finite_number(v) or v is None or (
                isinstance(v, list) and len(v) <= 64 and all(type(i) is int and 0 <= i < 4096 for i in v)))
            for k, v in guidance.items()):
        raise _refuse(path, "cfg.student.guidance must map names to numbers (cfg_skip_layers: block indices)")
    if not all(isinstance(marker.get(k, ""), str) for k in ("recipe", "teacher")):
        raise _refuse(path, "cfg.student.recipe and .teacher must be text")


def _meta_state(path: Path, handle) -> dict[str, torch.Tensor]:
    """The file's tensors as empty tensors on the meta device (names, shapes, dtypes; no data)."""
    from safetensors import SafetensorError

    state = {}
    try:
        keys = handle.keys()
        if len(keys) > MAX_TENSORS:
            raise _refuse(path, f"it holds {len(keys)} tensors (a DiT has a few hundred)")
        for key in keys:
            piece = handle.get_slice(key)
            dtype = DTYPES.get(piece.get_dtype())
            if dtype is None:
                raise _refuse(path, f"tensor {key[:60]!r} is {piece.get_dtype()}; a DiT holds floats only")
            state[key] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
    except SafetensorError as err:
        raise UserError(f"{path} is not a valid safetensors file ({err})") from None
    return state



def _speaker_count(path: Path, state: dict[str, torch.Tensor], speakers: dict[str, int]) -> int:
    table = state.get("spk_embed.weight")
    n = table.shape[0] if table is not None and table.ndim == 2 else len(speakers)
    if max(speakers.values()) >= n:
        raise _refuse(path, f"cfg.spk2idx lists index {max(speakers.values())} but the model has {n} speaker "
                      "embeddings")
    return n


def check_against_tensors(path: Path, family: Family, cfg: dict, state: dict[str, torch.Tensor]) -> None:
    """The sizes the metadata claims must be the tensors' own, before any network is built: depth
    and width first (so the skeleton below is no bigger than the file), then every key and shape of
    the family's network built on the meta device (no memory)."""
    try:
        rank = lora_rank_of(state)
    except (ValueError, IndexError) as err:
        raise _refuse(path, f"malformed LoRA adapters ({err})") from None
    if rank is not None and "lora_alpha" not in cfg.get("training", {}):
        raise _refuse(path, f"it carries LoRA adapters (rank {rank}) but no cfg.training.lora_alpha")
    try:
        config = family.read_config(cfg, state, _speaker_count(path, state, cfg["spk2idx"]), path)
    except (KeyError, IndexError) as err:  # a tensor the sizes are read from is missing or flat
        raise _refuse(path, f"tensor {err} is missing or has too few dimensions") from None
    blocks = {k.split(".")[1] for k in state if k.startswith("transformer_blocks.")}
    if len(blocks) != config.depth:
        raise _refuse(path, f"cfg.model says depth {config.depth} but the file holds {len(blocks)} blocks")
    width = state.get("output.weight")
    if width is None or width.ndim != 2 or width.shape[1] != config.dim:
        raise _refuse(path, f"cfg.model says dim {config.dim} but output.weight is "
                      f"{None if width is None else list(width.shape)}")
    with torch.device("meta"):
        skeleton = family.network(config)
        if STUDENT_KEY in cfg:
            make_student(skeleton)
    expected = skeleton.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        parts = [f"missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}"] * bool(missing)
        named = ", ".join(k[:60] for k in extra[:3])
        parts += [f"unexpected {len(extra)} tensor(s), e.g. {named}"] * bool(extra)
        raise _refuse(path, f"its tensors do not match a {family.describe(config)}: {'; '.join(parts)}")
    for key, want in expected.items():
        if tuple(state[key].shape) != tuple(want.shape):
            raise _refuse(path, f"{key} is {list(state[key].shape)} in the file, {list(want.shape)} in a "
                          f"{family.describe(config)}")


def _checked(path: Path):
    """(handle, family, cfg, meta state) of a voice file whose metadata fits its tensors."""
    handle = _open(path)
    meta = read_metadata(path, handle.metadata())
    state = _meta_state(path, handle)
    try:
        family = family_of_state(state)
    except UserError as err:
        raise _refuse(path, str(err)) from None
    if meta["family"] != family.name:
        raise _refuse(path, f"its metadata says family {meta['family']!r} but its tensors are "
                      f"{family.label}'s")
    check_against_tensors(path, family, meta["cfg"], state)
    return handle, family, meta["cfg"], state


def voice_family(path: str | Path) -> str:
    """The family name of a `.safetensors` voice, from its header (no tensor data read)."""
    return _checked(Path(path))[1].name


def read_voice(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(DiT state dict, hyper_parameters.cfg) of a `.safetensors` voice, everything checked first;
    `load_dit` builds the network from them as it does from a checkpoint's."""
    path = Path(path)
    handle, _, cfg, meta = _checked(path)
    state = {key: handle.get_tensor(key) for key in meta}
    for key, tensor in state.items():  # the header was read twice: the data must be what it said
        if tensor.shape != meta[key].shape or tensor.dtype != meta[key].dtype:
            raise _refuse(path, f"tensor {key} changed while reading")
    if STUDENT_KEY in cfg:
        StudentInfo.from_dict(cfg[STUDENT_KEY])  # its own checks, one line
    return state, cfg
