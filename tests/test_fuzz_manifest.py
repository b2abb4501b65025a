"""Property-based fuzzing (hypothesis) of bundle manifests (issue 20): any JSON value of any type
at any field the runtime reads, in a real exported bundle, gives a working backend or one
UserError line; never a traceback (the issue found seven different ones)."""

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtsvc.backends.bundle import MANIFEST, read_bundle
from rtsvc.backends.onnx_backend import OnnxBackend
from rtsvc.errors import UserError
from tests.tiny_encoders import make_tiny_pretrained_dir
from tests.tiny_models import make_tiny_dit_checkpoint

NAMES = ["v2", "v3", "alice", "dit.onnx", "../x", "/etc/hostname"]
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
           | st.text(max_size=8) | st.sampled_from(NAMES))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
FIELDS = [("family",), ("name",), ("audio",), ("audio", "sample_rate"), ("audio", "hop_length"),
          ("speakers",), ("speakers", "alice"), ("speakers", "zed"), ("dit",), ("dit", "inputs"),
          ("dit", "cfg_skip_layers"),
          ("dit", "num_speaker"), ("dit", "depth"), ("defaults",), ("defaults", "speaker"),
          ("defaults", "steps"), ("defaults", "cfg_strength"), ("features",), ("features", "whisper"),
          ("features", "contentvec"), ("features", "contentvec", "onnx"), ("files", "dit.onnx"),
          ("files", "dit.onnx", "bytes"), ("student",), ("student", "nfe"), ("export",),
          ("export", "precision"), ("vocoder",), ("source",)]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from rtsvc.export.onnx_export import export_bundle

    root = tmp_path_factory.mktemp("fuzz_manifest")
    ckpt = make_tiny_dit_checkpoint(root / "tiny.ckpt", dim=32, depth=1)
    path = export_bundle(ckpt, root / "tiny.rtsvc", make_tiny_pretrained_dir(root / "pretrained")).path
    return path, json.loads((path / MANIFEST).read_text())


def replace_at(manifest: dict, path: tuple, value) -> dict:
    manifest = copy.deepcopy(manifest)
    node = manifest
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return manifest


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(FIELDS), values), min_size=1, max_size=3))
def test_any_manifest_value_opens_or_gives_one_line_user_error(bundle, edits):
    path, original = bundle
    manifest = original
    for field, value in edits:
        manifest = replace_at(manifest, field, value)
    (path / MANIFEST).write_text(json.dumps(manifest))
    try:
        opened = read_bundle(path)
        _ = opened.speakers, opened.family, opened.sample_rate
        backend = OnnxBackend.open(path, device="cpu")
        assert backend.speakers and backend.family in ("v2", "v3")
    except UserError as err:
        assert str(err) and "\n" not in str(err)
    finally:
        (path / MANIFEST).write_text(json.dumps(original))
