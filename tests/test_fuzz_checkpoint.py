"""Property-based fuzzing (hypothesis) of checkpoints: `load_dit` on small crafted dict checkpoints
(saved with torch.save) whose hyper_parameters hold any plain dicts, lists, strings and numbers, or
whose state dict holds hostile tensor views (huge shapes over tiny storages, stride 0, overlaps),
gives a loaded model or a one-line UserError, never another exception (nor gigabytes of memory)."""

import copy
import resource

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
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


# --- hostile tensors (issue 20): shapes and strides that claim far more than the file holds ------

SIZES = st.sampled_from([0, 1, 2, 3, 64, 128, 768, 10**6, 10**11])
STRIDES = st.sampled_from([0, 1, 2, 3, 64, 128, 10**6])


@st.composite
def hostile_tensors(draw):
    """A view of a small storage (<= 4096 floats) with any in-bounds size/stride/offset: stride-0
    giants, transposes, overlapping windows, empty tensors, or an ordinary contiguous block."""
    base = torch.randn(draw(st.integers(1, 4096)))
    ndim = draw(st.integers(1, 3))
    size = draw(st.lists(SIZES, min_size=ndim, max_size=ndim))
    stride = draw(st.lists(STRIDES, min_size=ndim, max_size=ndim))
    offset = draw(st.integers(0, base.numel() - 1))
    try:
        return torch.as_strided(base, size, stride, offset)
    except RuntimeError:  # out of the storage's bounds: not a tensor torch.save could write
        assume(False)


STATE_KEYS = ["model.transformer.output.weight", "model.transformer.cond_embed.cvec_embed.weight",
              "model.transformer.spk_embed.weight", "model.transformer.input_embed.proj.weight",
              "model.transformer.extra.weight"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow,
                                                                  HealthCheck.filter_too_much])
@given(st.lists(st.tuples(st.sampled_from(STATE_KEYS), hostile_tensors()), min_size=1, max_size=3),
       st.booleans())
def test_hostile_tensors_load_or_give_one_line_user_error_in_bounded_memory(tiny_checkpoint, tensors,
                                                                           shared):
    """Any views in the state dict (optionally several over one storage): a loaded model or one
    UserError line, and this process's peak memory never grows by more than 300 MB."""
    ckpt, folder = tiny_checkpoint
    state = dict(ckpt["state_dict"])
    for key, tensor in tensors:
        if shared and tensor.numel():  # views of one storage: overlap unless the ranges are disjoint
            tensor = torch.as_strided(tensors[0][1], tensor.shape, tensor.stride(), 0) \
                if tensors[0][1].numel() >= tensor.numel() else tensor
        state[key] = tensor
    target = folder / "tensors.ckpt"
    torch.save({**ckpt, "state_dict": state}, target)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        load_dit(target)
    except UserError as err:
        assert str(err) and "\n" not in str(err)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 300, grown_mb
