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


def plain(obj: Any) -> Any:
    """Plain Python view: stand-in value nodes become their value, containers plain dict / list."""
    if isinstance(obj, ConfigValue):
        return plain(obj.value)
    if isinstance(obj, dict) and not isinstance(obj, collections.OrderedDict):
        return {key: plain(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [plain(value) for value in obj]
    if type(obj) is tuple:
        return tuple(plain(value) for value in obj)
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


class AllowListUnpickler(pickle.Unpickler):
    """`find_class` answers only from ALLOWED_GLOBALS; anything else raises RefusedGlobal."""

    def find_class(self, module: str, name: str) -> Any:
        module, name = _PY2_NAMES.get((module, name), (module, name))
        if module == "__builtin__":  # protocol-2 pickles spell builtins the Python 2 way
            module = "builtins"
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise RefusedGlobal(module, name)
        return found


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
    mmap = mmap and zipfile.is_zipfile(path)  # torch maps only its zip format; legacy files are read
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=False, pickle_module=allow_list_pickle,
                            mmap=mmap)
    except RefusedGlobal as err:
        raise UserError(f"refusing to load {what} {path}: it references {err.qualified}, which is not "
                        "tensor data or a known config class (loading it could run code)") from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for non-torch files
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(f"{path} is not a PyTorch checkpoint (reading it as a {what}: "
                        f"{type(err).__name__}: {first})") from None
    return plain(loaded)
