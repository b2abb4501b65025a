"""Reading torch files without ever running code from them.

A pickle can name any importable callable and have the loader call it (`__reduce__` returning
`(os.system, ("...",))` runs a command on load). `load_torch_file` unpickles with an allow-list:
tensors and their storages, plain containers and values, and data-only stand-ins for the config
classes RIFT-SVC / Lightning checkpoints pickle (OmegaConf `DictConfig` / `ListConfig` and their
nodes, Lightning's `AttributeDict`). Any other global is refused with one line naming it, before
anything from the file is called. The stand-ins turn into plain dicts, lists and values, so the
loaded object never needs omegaconf or lightning installed.
"""

import _codecs
import builtins
import collections
import pickle
import tarfile
import types
import zipfile
from pathlib import Path
from typing import Any

import torch

from rtsvc.errors import UserError


class ConfigDict(dict):
    """Stands in for OmegaConf `DictConfig` and Lightning `AttributeDict`: a plain dict of the
    container's items (OmegaConf keeps them under `_content`, Lightning in the dict itself)."""

    def __setstate__(self, state: Any) -> None:
        content = state.get("_content") if isinstance(state, dict) else None
        if isinstance(content, dict):
            self.update({key: plain(value) for key, value in content.items()})


class ConfigList(list):
    """Stands in for OmegaConf `ListConfig`: its items, from `_content`."""

    def __setstate__(self, state: Any) -> None:
        content = state.get("_content") if isinstance(state, dict) else None
        if isinstance(content, list):
            self.extend(plain(value) for value in content)


class ConfigValue:
    """Stands in for an OmegaConf value node (AnyNode, IntegerNode, ...): keeps `_val` only."""

    value: Any = None

    def __setstate__(self, state: Any) -> None:
        self.value = state.get("_val") if isinstance(state, dict) else None


class ConfigMetadata:
    """Stands in for OmegaConf's metadata dataclasses; their content is not needed, so dropped."""

    def __setstate__(self, state: Any) -> None:
        pass


class TypingAny:
    """Stands in for `typing.Any` (OmegaConf records it as a container's key and element type)."""


MAX_NESTING = 100  # containers inside containers; real checkpoints nest fewer than 10


class TooDeep(ValueError):
    pass


def plain(obj: Any, depth: int = 0) -> Any:
    """Plain Python view: stand-in value nodes become their value, containers plain dict / list.
    Deeper than MAX_NESTING is refused (TooDeep), before Python's recursion limit."""
    if depth > MAX_NESTING:
        raise TooDeep(f"containers nested more than {MAX_NESTING} deep")
    if isinstance(obj, ConfigValue):
        return plain(obj.value, depth + 1)
    if isinstance(obj, dict) and not isinstance(obj, collections.OrderedDict):
        return {key: plain(value, depth + 1) for key, value in obj.items()}
    if isinstance(obj, collections.OrderedDict):  # state dicts: walked for the bound, kept as they are
        for value in obj.values():
            plain(value, depth + 1)
        return obj
    if isinstance(obj, list):
        return [plain(value, depth + 1) for value in obj]
    if type(obj) is tuple:
        return tuple(plain(value, depth + 1) for value in obj)
    return obj


_OMEGACONF_VALUES = ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode",
                     "PathNode", "EnumNode", "ValueNode")
_ATTRIBUTE_DICTS = ("lightning.fabric.utilities.data", "lightning_fabric.utilities.data",
                    "pytorch_lightning.utilities.parsing", "lightning.pytorch.utilities.parsing")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): collections.defaultdict,
        ("_codecs", "encode"): _codecs.encode,  # how protocol-2 pickles write bytes
        ("typing", "Any"): TypingAny,
        ("omegaconf.dictconfig", "DictConfig"): ConfigDict,
        ("omegaconf.listconfig", "ListConfig"): ConfigList,
        ("omegaconf.base", "ContainerMetadata"): ConfigMetadata,
        ("omegaconf.base", "Metadata"): ConfigMetadata,
    }
    for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bytes", "bool",
                 "complex", "slice"):
        allowed[("builtins", name)] = getattr(builtins, name)
    for name in _OMEGACONF_VALUES:
        allowed[("omegaconf.nodes", name)] = ConfigValue
    for module in _ATTRIBUTE_DICTS:
        allowed[(module, "AttributeDict")] = ConfigDict
    for name in dir(torch):  # dtypes: torch.float32, torch.bfloat16, ...
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


ALLOWED_GLOBALS = _allowed_globals()
_PY2_NAMES = {("__builtin__", "long"): ("builtins", "int"), ("__builtin__", "unicode"): ("builtins", "str")}


class RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


class UnsafeTensor(pickle.UnpicklingError):
    pass


class AllowListUnpickler(pickle.Unpickler):
    """`find_class` answers only from ALLOWED_GLOBALS; anything else raises RefusedGlobal. Tensors
    are rebuilt through `_rebuild_tensor`, which refuses views a training run never saves but an
    attacker would: stride-0 or other non-contiguous views (`zeros(1).expand(64, 10**11)` claims
    25 TB in 4 bytes) and tensors sharing bytes of one storage (one block of data named a thousand
    times). So every tensor owns its bytes, and the loaded tensors never exceed the file."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._claimed: dict[int, list[tuple[int, int]]] = {}  # storage -> byte ranges of its tensors

    def find_class(self, module: str, name: str) -> Any:
        module, name = _PY2_NAMES.get((module, name), (module, name))
        if module == "__builtin__":  # protocol-2 pickles spell builtins the Python 2 way
            module = "builtins"
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise RefusedGlobal(module, name)
        return found

    def _rebuild_tensor(self, storage, offset, size, stride, *rest) -> torch.Tensor:
        tensor = torch._utils._rebuild_tensor_v2(storage, offset, size, stride, *rest)
        if tensor.numel() == 0:
            return tensor
        if not tensor.is_contiguous():
            raise UnsafeTensor(f"a tensor of shape {list(tensor.shape)} with strides {list(tensor.stride())} "
                               "(a stride-0 or non-contiguous view)")
        start = tensor.storage_offset() * tensor.element_size()
        span = (start, start + tensor.numel() * tensor.element_size())
        claimed = self._claimed.setdefault(tensor.untyped_storage().data_ptr(), [])
        if any(span[0] < end and begin < span[1] for begin, end in claimed):
            raise UnsafeTensor(f"tensors that share storage bytes (a tensor of shape {list(tensor.shape)} "
                               "overlaps another)")
        claimed.append(span)
        return tensor


def _load(file, **kwargs) -> Any:
    return AllowListUnpickler(file, **kwargs).load()


# torch.load's `pickle_module`: torch wraps `Unpickler` (to map its storage classes first) and
# calls `load` for the legacy format's header, so both go through the allow-list.
allow_list_pickle = types.SimpleNamespace(Unpickler=AllowListUnpickler, load=_load,
                                          __name__="rtsvc_allow_list_pickle")


def load_torch_file(path: str | Path, what: str, mmap: bool = False) -> Any:
    """torch.load of `path` through the allow-list; UserError (one line) for a missing file, a
    file that is not a torch file, or one that names a global outside the allow-list. `mmap=True`
    maps tensor data instead of reading it (cheap when only the structure is wanted)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory, expected a file")
    if not path.is_file():
        raise UserError(f"refusing to read {what} {path}: not a regular file (a pipe or device)")
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        _check_zip(path, what)
    elif tarfile.is_tarfile(path):  # torch < 0.4's format: torch extracts members (FIFOs too) to disk
        raise UserError(f"refusing to load {what} {path}: a legacy tar checkpoint (PyTorch before 2018), "
                        "which rtsvc does not read; re-save it with a current torch.save")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=False, pickle_module=allow_list_pickle,
                            mmap=mmap and is_zip)  # torch maps only its zip format; legacy files are read
        return plain(loaded)
    except RefusedGlobal as err:
        raise UserError(f"refusing to load {what} {path}: it references {err.qualified}, which is not "
                        "tensor data or a known config class (loading it could run code)") from None
    except (UnsafeTensor, TooDeep, RecursionError) as err:
        reason = str(err) if not isinstance(err, RecursionError) else "containers nested too deep"
        raise UserError(f"refusing to load {what} {path}: it holds {reason}, which no checkpoint "
                        "needs") from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for non-torch files
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(f"{path} is not a PyTorch checkpoint (reading it as a {what}: "
                        f"{type(err).__name__}: {first})") from None


MAX_ZIP_EXPANSION = 4  # stored (torch.save) is 1x; deflated float weights barely shrink


def _check_zip(path: Path, what: str) -> None:
    """A zip checkpoint's members may not unpack to much more than the file (a zip bomb)."""
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise UserError(f"{path} is not a PyTorch checkpoint (reading it as a {what}: {err})") from None
    if unpacked > MAX_ZIP_EXPANSION * path.stat().st_size + (1 << 20):
        raise UserError(f"refusing to load {what} {path}: its members unpack to {unpacked / 2**20:.0f} MiB "
                        f"from a {path.stat().st_size / 2**20:.1f} MiB file")
