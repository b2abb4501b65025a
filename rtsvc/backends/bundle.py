"""The `.rtsvc` model bundle: a directory with `manifest.json`, `dit.onnx`, `vocoder.onnx` (+ encoders).

`rtsvc export` writes it, `read_bundle` checks it before anything runs: the manifest must parse,
its format version must be one this code reads, and every file it lists must exist with the
sha256 recorded at export time. Any mismatch is refused with one line naming the file, so a
half-copied or edited bundle never produces audio that silently differs from the checkpoint.
The format is described for users in docs/bundle.md.
"""

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rtsvc.dsp.audio import HOP_LENGTH, SAMPLE_RATE
from rtsvc.errors import UserError

FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST = "manifest.json"
BUNDLE_SUFFIX = ".rtsvc"
DIT_FILE = "dit.onnx"
VOCODER_FILE = "vocoder.onnx"
# graph interfaces (docs/bundle.md): the exporter writes them, the ONNX backend feeds them
DIT_INPUTS = ("x", "t", "spk", "f0", "rms", "cvec", "whisper", "cfg_strength")  # V2
DIT_V3_INPUTS = ("x", "t", "spk", "f0", "rms", "cvec", "bad_cvec", "ds_cfg_strength", "spk_cfg_strength",
                 "skip_cfg_strength", "cfg_rescale")
STUDENT_DIT_INPUTS = ("x", "t", "dt", "spk", "f0", "rms", "cvec", "whisper")  # a distilled V2 student
STUDENT_V3_DIT_INPUTS = ("x", "t", "dt", "spk", "f0", "rms", "cvec")  # a distilled V3 student
DIT_OUTPUT = "velocity"
VOCODER_INPUTS = ("mel", "f0", "phase", "noise")
VOCODER_OUTPUT = "audio"
REQUIRED_KEYS = ("format_version", "audio", "speakers", "dit", "defaults", "features", "files")
HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its directory and parsed manifest."""

    path: Path
    manifest: dict

    @property
    def speakers(self) -> dict[str, int]:
        """Name -> index, the default speaker (`defaults.speaker`, the voice `rtsvc train` added) first."""
        speakers = dict(self.manifest["speakers"])
        default = self.manifest["defaults"].get("speaker")
        if default in speakers:
            speakers = {default: speakers.pop(default), **speakers}
        return speakers

    @property
    def family(self) -> str:
        """The DiT family's name (`rtsvc.models.families`; validated); bundles written before V3 support
        are V2."""
        return str(self.manifest.get("family", "v2"))

    @property
    def sample_rate(self) -> int:
        return int(self.manifest["audio"]["sample_rate"])

    def file(self, name: str) -> Path:
        """Absolute path of a listed file (`dit.onnx`, `vocoder.onnx`, an encoder)."""
        if name not in self.manifest["files"]:
            raise UserError(f"bundle {self.path}: manifest.json lists no file {name!r}")
        return self.path / name

    def has(self, name: str) -> bool:
        return name in self.manifest["files"]

    def graph(self, name: str) -> Path:
        """`file(name)` for an ONNX graph, after checking where its external data lives: ONNX
        Runtime would read any path a graph names (`/etc/passwd`, `../../secret`), so every
        external-data location must be a file this bundle lists (hence hashed)."""
        path = self.file(name)
        for location in external_data_locations(path):
            rel = PurePosixPath(location.replace("\\", "/"))
            target = (path.parent / rel).resolve()
            inside = target.is_relative_to(self.path.resolve())
            listed = inside and target.relative_to(self.path.resolve()).as_posix() in self.manifest["files"]
            if rel.is_absolute() or ".." in rel.parts or not listed:
                raise UserError(f"bundle {self.path}: {_shown(name)} reads external data from "
                                f"{_shown(location)[:120]!s}, which is not a file of this bundle")
        return path


def _graph_tensors(graph) -> Iterator:
    """Every tensor of an ONNX graph that may hold external data, subgraphs (If, Loop) included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def external_data_locations(path: str | Path) -> list[str]:
    """The external-data file names an ONNX graph refers to (its `location` entries), read without
    loading any external data; UserError when the file is not an ONNX graph."""
    import onnx
    from onnx import TensorProto

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf raises its own types for foreign bytes
        raise UserError(f"{path} is not an ONNX graph ({type(err).__name__})") from None
    locations = []
    for tensor in _graph_tensors(model.graph):
        if tensor.data_location == TensorProto.EXTERNAL:
            entry = {e.key: e.value for e in tensor.external_data}
            locations.append(entry.get("location", ""))
    return locations


def is_bundle(path: str | Path) -> bool:
    """A bundle is a directory holding manifest.json (the `.rtsvc` suffix is a convention only)."""
    path = Path(path)
    return path.is_dir() and ((path / MANIFEST).is_file() or path.suffix == BUNDLE_SUFFIX)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(bundle_dir: str | Path, manifest: dict) -> Path:
    """Hash every file in `bundle_dir` (all levels) and write manifest.json with the result.

    `manifest` holds everything but `files` and `format_version`, which are filled in here, so a
    manifest can never list a file that is not in the bundle or miss one that is (external ONNX
    weight files included).
    """
    bundle_dir = Path(bundle_dir)
    files = {}
    for path in sorted(p for p in bundle_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(bundle_dir).as_posix()
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    full = {"format_version": FORMAT_VERSION, **manifest, "files": files}
    out = bundle_dir / MANIFEST
    out.write_text(json.dumps(full, indent=2, sort_keys=False) + "\n")
    return out


def _load_manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST
    if not path.exists():
        raise UserError(f"bundle not found: {path}")
    if not path.is_dir():
        raise UserError(f"not an rtsvc bundle: {path} is a file (a bundle is a NAME.rtsvc directory)")
    if not manifest_path.is_file():
        raise UserError(f"bundle {path}: manifest.json is missing (not a bundle, or an incomplete copy)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"bundle {path}: manifest.json is not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"bundle {path}: manifest.json must hold a JSON object")
    return manifest


def _check_version(path: Path, manifest: dict) -> None:
    version = manifest.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
        raise UserError(f"bundle {path}: unknown format_version {version!r} (this rtsvc reads {supported}); "
                        "export it again with this rtsvc or upgrade rtsvc")


def _shown(text: str) -> str:
    """Manifest text in a one-line message: as is, or quoted when it holds newlines or controls."""
    return text if text.isprintable() else repr(text)


MAX_SPEAKERS = 1 << 20  # speaker indices above this are corrupt (and would overflow an int64 feed)
FAMILY_INTERFACES = {"v2": (DIT_INPUTS, STUDENT_DIT_INPUTS), "v3": (DIT_V3_INPUTS, STUDENT_V3_DIT_INPUTS)}
NUMERIC_DEFAULTS = ("steps", "cfg_strength", "ds_cfg_strength", "spk_cfg_strength", "skip_cfg_strength",
                    "cfg_rescale")


def _is_int(value: object, minimum: int, maximum: int | None = None) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and value >= minimum
            and (maximum is None or value <= maximum))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _schema_errors(manifest: dict) -> list[str]:
    """What in a manifest has the wrong type or an impossible value (every field this code reads),
    as short phrases; values written by a stranger never reach a network or a traceback."""
    errors = []
    for key in ("audio", "speakers", "dit", "defaults", "features", "files"):
        if not isinstance(manifest[key], dict):
            errors.append(f'"{key}" must be an object, got {type(manifest[key]).__name__}')
    for key in ("vocoder", "export", "source", "student"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            errors.append(f'"{key}" must be an object, got {type(manifest[key]).__name__}')
    if errors:
        return errors
    if not isinstance(manifest.get("name", ""), str):
        errors.append('"name" must be a string')
    family = manifest.get("family", "v2")
    if not (isinstance(family, str) and family in FAMILY_INTERFACES):
        errors.append(f'"family" must be "v2" or "v3", got {_shown(json.dumps(family))[:40]}')
        family = None
    for key, want in (("sample_rate", SAMPLE_RATE), ("hop_length", HOP_LENGTH)):
        value = manifest["audio"].get(key)
        if not _is_int(value, 1):
            errors.append(f'"audio.{key}" must be a positive integer')
        elif value != want:
            errors.append(f'"audio.{key}" is {value}; this rtsvc runs {want}')
    dit = manifest["dit"]
    for key in ("dim", "depth", "head_dim", "num_speaker", "n_mel", "cvec_dim", "whisper_dim"):
        if dit.get(key) is not None and not _is_int(dit[key], 1, 1 << 16):
            errors.append(f'"dit.{key}" must be a positive integer')
    inputs = dit.get("inputs")
    if inputs is not None and not _is_str_list(inputs):
        errors.append('"dit.inputs" must be a list of input names')
    elif family is not None and inputs and tuple(inputs) not in FAMILY_INTERFACES[family]:
        errors.append(f'"dit.inputs" {_shown(", ".join(inputs))[:80]} is not a {family} DiT interface '
                      f"(family {family})")
    layers = dit.get("cfg_skip_layers")
    depth = dit.get("depth") if _is_int(dit.get("depth"), 1, 1 << 16) else 1 << 16
    listed = isinstance(layers, list) and all(_is_int(i, 0, depth - 1) for i in layers)
    if layers is not None and not listed:
        errors.append(f'"dit.cfg_skip_layers" must be null or a list of block numbers 0..{depth - 1}')
    speakers = manifest["speakers"]
    count = dit.get("num_speaker") if _is_int(dit.get("num_speaker"), 1, MAX_SPEAKERS) else MAX_SPEAKERS
    if not speakers:
        errors.append('"speakers" lists no speaker')
    elif not all(isinstance(k, str) and k and _is_int(v, 0, count - 1) for k, v in speakers.items()):
        errors.append(f'"speakers" must map speaker names to indices (integers 0..{count - 1})')
    defaults = manifest["defaults"]
    if defaults.get("speaker") is not None and not isinstance(defaults["speaker"], str):
        errors.append('"defaults.speaker" must be a speaker name')
    for key in NUMERIC_DEFAULTS:
        if defaults.get(key) is not None and not _is_number(defaults[key]):
            errors.append(f'"defaults.{key}" must be a number')
    for name in ("contentvec", "whisper", "fcpe"):
        entry = manifest["features"].get(name)
        if entry is not None and not (isinstance(entry, dict) and all(
                isinstance(entry.get(k), str | None) for k in ("onnx", "preprocessor"))):
            errors.append(f'"features.{name}" must be an object naming its files')
    export = manifest.get("export") or {}
    if not isinstance(export.get("precision", ""), str):
        errors.append('"export.precision" must be a string')
    for name, entry in manifest["files"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and (entry.get("bytes") is None or _is_int(entry["bytes"], 0))):
            errors.append(f'"files.{_shown(name)}" must be an object with a "sha256" string and "bytes" '
                          "integer")
            break
    return errors


def _check_keys(path: Path, manifest: dict) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise UserError(f"bundle {path}: manifest.json lacks {', '.join(missing)}")
    errors = _schema_errors(manifest)
    if errors:
        raise UserError(f"bundle {path}: manifest.json is malformed: {'; '.join(errors)}")
    for name in (DIT_FILE, VOCODER_FILE):
        if name not in manifest["files"]:
            raise UserError(f"bundle {path}: manifest.json does not list {name}")


def _check_file(path: Path, name: str, entry: dict, verify_hashes: bool) -> None:
    rel = PurePosixPath(name)
    if not name or "\0" in name or rel.is_absolute() or ".." in rel.parts:
        raise UserError(f"bundle {path}: manifest.json lists a file outside the bundle: {name!r}")
    file = path / rel
    if not file.resolve().is_relative_to(path.resolve()):  # a link (or a linked folder) out of it
        raise UserError(f"bundle {path}: {_shown(name)} is a link to a file outside the bundle "
                        f"({_shown(str(file.resolve()))}); copy the file into the bundle")
    if not file.is_file():
        raise UserError(f"bundle {path}: {_shown(name)} is missing (listed in manifest.json): "
                        "the bundle is incomplete")
    size = entry.get("bytes")
    if size is not None and file.stat().st_size != size:
        raise UserError(f"bundle {path}: {_shown(name)} has {file.stat().st_size} bytes, manifest.json says "
                        f"{size} (file truncated or changed after export)")
    if verify_hashes:
        actual = sha256_file(file)
        if actual != entry["sha256"]:
            raise UserError(f"bundle {path}: {_shown(name)} sha256 mismatch (expected "
                            f"{_shown(entry['sha256'][:12])}…, "
                            f"got {actual[:12]}…): the file was changed or corrupted after export")


def read_bundle(path: str | Path, verify_hashes: bool = True) -> Bundle:
    """Parse and verify a bundle; raise UserError (one line, naming the file) for anything wrong."""
    path = Path(path)
    manifest = _load_manifest(path)
    _check_version(path, manifest)
    _check_keys(path, manifest)
    for name, entry in manifest["files"].items():
        _check_file(path, name, entry, verify_hashes)
    return Bundle(path=path, manifest=manifest)


def replaceable_bundle_problem(path: str | Path) -> str | None:
    """Why `path` may not be deleted to make room for a new export (None: it may). Only a folder
    that provably is an rtsvc bundle is replaced: its manifest validates as ours and the folder
    holds nothing but manifest.json and the files it lists (a web project with a manifest.json,
    or a bundle someone added notes to, is not ours to delete)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return "it is not a plain folder"
    try:
        manifest = read_bundle(path, verify_hashes=False).manifest
    except UserError as err:
        return f"it is not an rtsvc bundle ({str(err).removeprefix(f'bundle {path}: ')})"
    listed = {PurePosixPath(name) for name in manifest["files"]} | {PurePosixPath(MANIFEST)}
    folders = {parent for name in listed for parent in name.parents if parent != PurePosixPath(".")}
    for entry in path.rglob("*"):
        rel = PurePosixPath(entry.relative_to(path).as_posix())
        if entry.is_symlink() or not (rel in listed and entry.is_file() or rel in folders and entry.is_dir()):
            return f"it holds {_shown(str(rel))}, which is not one of its bundle files"
    return None


def bundle_components(path: str | Path) -> set[str]:
    """Pretrained components a bundle carries itself (so a pretrained dir need not have them):
    always the vocoder; ContentVec and Whisper when exported with --with-encoders. Reads the
    manifest without verifying (`read_bundle` does that when the model opens)."""
    try:
        features = json.loads((Path(path) / MANIFEST).read_text()).get("features", {})
    except (OSError, ValueError, AttributeError):
        return {"vocoder"}
    has = {name for name in ("contentvec", "whisper") if (features.get(name) or {}).get("onnx")}
    encoders = {"contentvec"} | ({"whisper"} if features.get("whisper") is not None else set())  # V3: null
    return {"vocoder"} | (has if has >= encoders else set())


def bundle_family(path: str | Path) -> str:
    """The DiT family a bundle's manifest records ("v2" when it records none: older bundles), read
    only from a manifest that validates (a stranger's bundle: one-line error otherwise)."""
    return read_bundle(path, verify_hashes=False).family
