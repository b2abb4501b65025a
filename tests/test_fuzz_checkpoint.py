"""Property-based fuzzing (hypothesis) of checkpoint metadata: `load_dit` on small crafted dict
checkpoints (saved with torch.save) whose hyper_parameters hold any plain dicts, lists, strings
and numbers gives a loaded model or a one-line UserError, never another exception."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtsvc.errors import UserError
from rtsvc.models.loading import load_dit
from tests.tiny_models import make_tiny_dit_checkpoint

scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
# where in the metadata a value is replaced (a path of keys from the checkpoint's top level)
PATHS = [("hyper_parameters",), ("hyper_parameters", "cfg"), ("hyper_parameters", "cfg", "spk2idx"),
         ("hyper_parameters", "cfg", "spk2idx", "alice"), ("hyper_parameters", "cfg", "model"),
         ("hyper_parameters", "cfg", "model", "cfg"), ("hyper_parameters", "cfg", "model", "cfg", "dim"),
         ("hyper_parameters", "cfg", "model", "cfg", "depth"),
         ("hyper_parameters", "cfg", "model", "cfg", "head_dim"),
         ("hyper_parameters", "cfg", "model", "name"),
         ("hyper_parameters", "cfg", "dataset"), ("state_dict",)]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = make_tiny_dit_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", dim=32, depth=1)
    return torch.load(path, weights_only=False), tmp_path_factory.mktemp("fuzzed")


def replace_at(ckpt: dict, path: tuple, value) -> dict:
    ckpt = {**ckpt, "hyper_parameters": copy.deepcopy(ckpt["hyper_parameters"])}
    node = ckpt
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return ckpt


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(PATHS), values), min_size=1, max_size=3))
def test_any_checkpoint_metadata_loads_or_gives_one_line_user_error(tiny_checkpoint, edits):
    ckpt, folder = tiny_checkpoint
    for path, value in edits:
        ckpt = replace_at(ckpt, path, value)
    target = folder / "fuzzed.ckpt"
    torch.save(ckpt, target)
    try:
        loaded = load_dit(target)
    except UserError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert loaded is not None
