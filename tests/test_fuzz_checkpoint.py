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


@pytest.mark.parametrize("family", ["v2", "v3"])
@pytest.mark.parametrize("field, value, words", [
    ("dim", 1, "dim=1, not a multiple of head_dim=32"),  # found by the fuzz above: an assert in Attention
    ("depth", "2", "invalid model size depth='2'"),
    ("head_dim", 0, "invalid model size head_dim=0"),
])
def test_model_sizes_are_checked_for_both_families(tmp_path, family, field, value, words):
    from tests.upstream.fixtures import make_v2_release, make_v3_head

    path, _ = (make_v2_release if family == "v2" else make_v3_head)(tmp_path / "m.ckpt", dim=64, depth=1)
    ckpt = torch.load(path, weights_only=False)
    model_cfg = ckpt["hyper_parameters"]["cfg"]["model"]
    (model_cfg["cfg"] if family == "v2" else model_cfg)[field] = value
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=words):
        load_dit(path)
