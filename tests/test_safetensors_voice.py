""".safetensors voices: exported from a checkpoint, they convert bit-identically to it (V2, V3 with
LoRA carried, students), load with pickle and torch.load disabled, and a stranger's file with any
bad metadata or tensor is refused in one line before a network is built."""

import json
import pickle

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rtsvc.errors import UserError
from rtsvc.models.loading import load_dit
from rtsvc.models.safetensors_voice import METADATA_KEY, read_voice
from rtsvc.settings import Knobs
from rtsvc.voices.spec import VoiceSpec, model_family, open_voice
from tests.cli_helpers import harmonic_tone, run_cli, write_wav
from tests.tiny_models import make_tiny_dit_checkpoint
from tests.upstream.fixtures import make_v3_head

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    root = tmp_path_factory.mktemp("st-v2")
    ckpt = make_tiny_dit_checkpoint(root / "v2.ckpt", speakers=("alice", "bob", "carol"))
    from rtsvc.export.safetensors_export import export_safetensors

    path, _ = export_safetensors(ckpt, root / "v2.safetensors")
    return ckpt, path


def _header(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()[METADATA_KEY])


def _rewrite(src, dst, change_meta=None, change_state=None, raw_meta=None):
    state, meta = _header(src)
    if change_meta:
        change_meta(meta)
    if change_state:
        change_state(state)
    text = raw_meta if raw_meta is not None else json.dumps(meta)
    save_file(state, str(dst), metadata={METADATA_KEY: text})
    return dst


def _convert(args, tmp_path, capsys, monkeypatch, name):
    code, _, err = run_cli([*args[:1], args[1], tmp_path / name, *args[2:]], capsys, monkeypatch)
    assert code == 0, err
    return sf.read(tmp_path / name, dtype="float32")[0]


def test_cli_export_then_convert_is_bit_identical_to_the_checkpoint(tmp_path, capsys, monkeypatch,
                                                                    tiny_pretrained):
    ckpt = make_tiny_dit_checkpoint(tmp_path / "voice.ckpt", speakers=("alice", "bob"), seed=3)
    out = tmp_path / "shared" / "voice.safetensors"
    code, _, err = run_cli(["export", ckpt, "--format", "safetensors", "--out", out], capsys, monkeypatch)
    assert code == 0, err
    assert "tensors read back bit-identical" in err and out.is_file()
    assert not list(out.parent.glob(".*partial*"))  # the work file is gone
    src = write_wav(tmp_path / "in.wav", harmonic_tone(1.0, 170.0))
    common = ["--pretrained-dir", tiny_pretrained, "--f0", "pyworld", "--steps", "3", "--speaker", "bob",
              "--device", "cpu"]
    from_ckpt = _convert(["convert", src, "--model", ckpt, *common], tmp_path, capsys, monkeypatch, "a.wav")
    from_st = _convert(["convert", src, "--model", out, *common], tmp_path, capsys, monkeypatch, "b.wav")
    assert np.sqrt(np.mean(from_ckpt ** 2)) > 1e-3  # a real output, not silence
    np.testing.assert_array_equal(from_st, from_ckpt)


def test_loading_needs_no_pickle(v2, monkeypatch):
    ckpt, path = v2
    want = load_dit(ckpt).model.state_dict()

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    import rtsvc.models.safe_load as safe_load

    monkeypatch.setattr(safe_load, "load_torch_file", refuse)
    import rtsvc.models.loading as loading

    monkeypatch.setattr(loading, "load_torch_file", refuse)
    with pytest.raises(AssertionError, match="pickle used"):  # the patch bites: a .ckpt cannot load now
        load_dit(ckpt)
    loaded = load_dit(path)
    assert loaded.speakers == {"alice": 0, "bob": 1, "carol": 2} and loaded.family == "v2"
    got = loaded.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert model_family(path) == "v2"


def test_v3_lora_carried_is_exact_and_folded_is_plain_v3(tmp_path, tiny_pretrained_v3):
    from rtsvc.export.safetensors_export import export_safetensors

    ckpt, _ = make_v3_head(tmp_path / "v3-lora.ckpt", lora_rank=4, lora_alpha=8.0)
    carried, _ = export_safetensors(ckpt, tmp_path / "carried.safetensors")
    folded, _ = export_safetensors(ckpt, tmp_path / "folded.safetensors", merge_lora=True)
    state, meta = _header(carried)
    assert any(k.endswith("k_proj.A") for k in state) and meta["cfg"]["training"] == {"lora_alpha": 8.0}
    state, meta = _header(folded)
    assert not any(k.endswith((".A", ".B")) for k in state) and "training" not in meta["cfg"]
    assert load_dit(folded).config.lora_rank is None and load_dit(carried).config.lora_rank == 4

    audio = harmonic_tone(0.8, 180.0)
    knobs = Knobs(steps=3, seed=1, speaker="bob", spk_cfg_strength=1.0)

    def convert(model):
        spec = VoiceSpec(model=model, pretrained_dir=tiny_pretrained_v3, f0="pyworld", backend="torch",
                         device="cpu", streaming=False)
        return open_voice(spec).convert(audio, knobs)

    ref = convert(ckpt)
    np.testing.assert_array_equal(convert(carried), ref)
    merged = convert(folded)  # W + s B A^T: the same function up to float rounding
    assert 0 < np.abs(merged - ref).max() < 1e-3 * np.abs(ref).max() + 1e-5


def test_a_student_keeps_its_marker_and_output(tmp_path, tiny_pretrained):
    from rtsvc.export.safetensors_export import export_safetensors

    ckpt = make_tiny_dit_checkpoint(tmp_path / "student.ckpt", student_nfe=2)
    path, _ = export_safetensors(ckpt, tmp_path / "student.safetensors")
    a, b = load_dit(ckpt), load_dit(path)
    assert b.student == a.student and b.student.nfe == 2
    audio = harmonic_tone(0.6, 150.0)
    outs = []
    for model in (ckpt, path):
        voice = open_voice(VoiceSpec(model=model, pretrained_dir=tiny_pretrained, f0="pyworld",
                                     backend="torch", device="cpu", streaming=False))
        assert voice.default_steps == 3
        outs.append(voice.convert(audio, Knobs(steps=3, seed=2)))
    np.testing.assert_array_equal(outs[1], outs[0])


# --- a stranger's file -----------------------------------------------------------------------------

def _set(path, value):
    def change(meta):
        node = meta
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


HOSTILE_META = [
    (_set(["format_version"], 2), "unknown format_version '2' (this rtsvc reads 1); a newer rtsvc wrote it"),
    (_set(["family"], "v3"), "metadata says family 'v3' but its tensors are V2's"),
    (_set(["cfg", "spk2idx"], {"alice": 0, "mallory": 7}), "lists index 7 but the model has 3 speaker"),
    (_set(["cfg", "spk2idx"], {"a\nb": 0}), "names are printable text"),
    (_set(["cfg", "spk2idx"], {}), "must map 1 to"),
    (_set(["cfg", "model", "cfg", "dim"], 4096), "says dim 4096 but output.weight is [128, 64]"),
    (_set(["cfg", "model", "cfg", "depth"], 60000), "says depth 60000 but the file holds 2 blocks"),
    (_set(["cfg", "model", "cfg", "dim"], "64"), "invalid model size dim='64'"),
    (_set(["cfg", "model", "cfg", "head_dim"], 48), "not a multiple of head_dim=48"),
    (_set(["cfg", "model", "cfg", "ff_mult"], 3), "is [128, 64] in the file, [192, 64] in a"),
    (_set(["cfg", "dataset", "sample_rate"], "44100"), "cfg.dataset must be an object of"),
    (_set(["cfg", "default_speaker"], "zed"), "default_speaker is not one of"),
    (_set(["cfg", "training"], {"lora_alpha": "x"}), "lora_alpha must be a positive number"),
    (_set(["cfg", "student"], {"nfe": 2, "grid": [0.0, 1.0]}), "grid must be nfe + 1 times"),
    (_set(["cfg", "student"], {"nfe": 1, "grid": [0, 1], "guidance": {"cfg_strength": "2"}}),
     "guidance must map"),
    (_set(["cfg", "extra"], 1), "unknown cfg key(s) 'extra'"),
    (_set(["cfg"], [1, 2]), "no \"cfg\" object"),
]


@pytest.mark.parametrize("change, message", HOSTILE_META, ids=[m for _, m in HOSTILE_META])
def test_bad_metadata_is_one_line_before_any_network(v2, tmp_path, monkeypatch, change, message):
    _, good = v2
    bad = _rewrite(good, tmp_path / "bad.safetensors", change_meta=change)
    from rtsvc.models.dit import DiT

    built, init = [], DiT.__init__

    def record(self, *args, **kwargs):  # where each DiT is built: the checks' skeleton is on "meta"
        built.append(torch.empty(0).device.type)
        init(self, *args, **kwargs)

    monkeypatch.setattr(DiT, "__init__", record)
    with pytest.raises(UserError) as err:
        load_dit(bad)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert set(built) <= {"meta"}  # no network with real memory was built
    load_dit(good)
    assert built[-1] == "cpu"  # the recording sees a real build


HOSTILE_FILES = [
    (dict(raw_meta="{not json"), "metadata is not valid JSON"),
    (dict(raw_meta="[" * 5000 + "]" * 5000), "not valid JSON"),
    (dict(raw_meta=json.dumps({"format": "rtsvc-voice",
                               "a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {}}}}}}}}})),
     "nests deeper than"),
    (dict(raw_meta=json.dumps({"format": "other"})), "not an object with \"format\": \"rtsvc-voice\""),
    (dict(change_state=lambda s: s.update(extra=torch.zeros(3))), "unexpected 1 tensor(s), e.g. extra"),
    (dict(change_state=lambda s: s.pop("output.bias")), "missing 1 tensor(s), e.g. output.bias"),
    (dict(change_state=lambda s: s.update({"spk_embed.weight": torch.zeros(3, 63)})),
     "spk_embed.weight is [3, 63] in the file"),
    (dict(change_state=lambda s: s.update({"output.bias": torch.zeros(128, dtype=torch.int64)})),
     "is I64; a DiT holds floats only"),
    (dict(change_state=lambda s: s.pop("cond_embed.cvec_embed.weight")),
     "cond_embed.cvec_embed.weight is missing"),
]


@pytest.mark.parametrize("kw, message", HOSTILE_FILES, ids=[m for _, m in HOSTILE_FILES])
def test_bad_files_are_one_line(v2, tmp_path, kw, message):
    _, good = v2
    bad = _rewrite(good, tmp_path / "bad.safetensors", **kw)
    with pytest.raises(UserError) as err:
        read_voice(bad)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_not_safetensors_at_all_is_one_line_through_the_cli(v2, tmp_path, capsys, monkeypatch,
                                                            tiny_pretrained):
    _, good = v2
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])  # truncated download
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))  # somebody's state dict, no rtsvc metadata
    src = write_wav(tmp_path / "in.wav", harmonic_tone(0.3))
    for path, message in ((cut, "is not a valid safetensors file"), (bare, "has no 'rtsvc' entry"),
                          (tmp_path, "model not found")):
        model = path if path != tmp_path else tmp_path / "missing.safetensors"
        code, _, err = run_cli(["convert", src, tmp_path / "o.wav", "--model", model, "--pretrained-dir",
                                tiny_pretrained, "--f0", "pyworld"], capsys, monkeypatch)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_any_value_at_any_metadata_field_loads_or_is_one_line(v2, tmp_path):
    _, good = v2
    _, meta = _header(good)
    paths = [["format_version"], ["family"], ["cfg", "spk2idx"], ["cfg", "default_speaker"],
             ["cfg", "dataset"], ["cfg", "model"], ["cfg", "model", "cfg"], ["cfg", "model", "cfg", "dim"],
             ["cfg", "model", "cfg", "depth"], ["cfg", "model", "cfg", "ff_mult"], ["cfg", "training"],
             ["cfg", "student"], ["source"]]
    values = [None, True, -1, 0, 2**63, 1e308, float("nan"), "x", [], [1], {}, {"a": 1}, [[[]]]]
    loaded = 0
    for path in paths:
        for value in values:
            bad = _rewrite(good, tmp_path / "f.safetensors", change_meta=_set(path, value))
            try:
                load_dit(bad)
                loaded += 1
            except UserError as err:
                assert "\n" not in str(err), (path, value)
    assert loaded > 0  # e.g. any "source" is only for the record


def test_export_refuses_onnx_options_and_other_names(v2, tmp_path, capsys, monkeypatch):
    ckpt, _ = v2
    for extra, message in ((["--int8"], "--int8 shape(s) an ONNX bundle"),
                           (["--fp16"], "--fp16 shape(s) an ONNX bundle"),
                           ([], "named like my-voice.safetensors")):
        out = tmp_path / ("x.safetensors" if extra else "x.bin")
        code, _, err = run_cli(["export", ckpt, "--format", "safetensors", "--out", out, *extra], capsys,
                               monkeypatch)
        assert code == 2 and message in err and not out.exists(), err
    code, _, err = run_cli(["export", ckpt, "--format", "tflite", "--out", tmp_path / "x"], capsys,
                           monkeypatch)
    assert code == 2 and "unknown --format 'tflite'" in err
    code, _, err = run_cli(["export", ckpt, "--merge-lora", "--out", tmp_path / "x.rtsvc"], capsys,
                           monkeypatch)
    assert code == 2 and "--merge-lora is for --format safetensors" in err
