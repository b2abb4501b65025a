"""Bundle manifest and verification: round trip, and every way a bundle can be broken.

The bundles here hold placeholder bytes instead of real graphs: verification happens before
ONNX Runtime ever opens a file, so tampering is detected the same way (tests/test_export.py
does it once more on a real exported bundle).
"""

import json

import pytest

from rtsvc.backends.bundle import (
    FORMAT_VERSION,
    MANIFEST,
    Bundle,
    bundle_components,
    read_bundle,
    sha256_file,
    write_manifest,
)
from rtsvc.errors import UserError
from tests.cli_helpers import harmonic_tone, run_cli, write_wav

MANIFEST_BODY = {
    "name": "fake", "audio": {"sample_rate": 44100, "hop_length": 512}, "speakers": {"alice": 0, "bob": 1},
    "dit": {"dim": 64, "depth": 2}, "defaults": {"steps": 32, "cfg_strength": 2.0}, "features": {},
}


def make_fake_bundle(path):
    path.mkdir(parents=True)
    (path / "dit.onnx").write_bytes(bytes(range(256)) * 8)
    (path / "vocoder.onnx").write_bytes(b"vocoder graph bytes" * 10)
    (path / "extra").mkdir()
    (path / "extra" / "weights.bin").write_bytes(b"\x01\x02\x03")
    write_manifest(path, MANIFEST_BODY)
    return path


@pytest.fixture
def bundle(tmp_path):
    return make_fake_bundle(tmp_path / "fake.rtsvc")


def edit_manifest(bundle, **changes):
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest.update(changes)
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def flip_byte(path, offset=100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_lists_every_file_with_its_hash(bundle):
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 1
    assert sorted(manifest["files"]) == ["dit.onnx", "extra/weights.bin", "vocoder.onnx"]
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(bundle / name)
        assert entry["bytes"] == (bundle / name).stat().st_size
    loaded = read_bundle(bundle)
    assert loaded.speakers == {"alice": 0, "bob": 1}
    assert loaded.sample_rate == 44100
    assert loaded.file("dit.onnx") == bundle / "dit.onnx"
    assert bundle_components(bundle) == {"vocoder"}  # no encoder graphs: ContentVec/Whisper from pretrained


@pytest.mark.parametrize("damage, message", [
    (lambda b: flip_byte(b / "dit.onnx"), r"dit\.onnx sha256 mismatch"),
    (lambda b: (b / "vocoder.onnx").unlink(), r"vocoder\.onnx is missing"),
    (lambda b: edit_manifest(b, format_version=99), r"unknown format_version 99"),
    (lambda b: (b / MANIFEST).unlink(), r"manifest\.json is missing"),
    (lambda b: (b / MANIFEST).write_text("{not json"), r"manifest\.json is not valid JSON"),
    (lambda b: (b / "extra" / "weights.bin").write_bytes(b"\x01\x02"), r"weights\.bin has 2 bytes, "
                                                                        r"manifest\.json says 3"),
])
def test_damaged_bundles_are_refused(bundle, damage, message):
    damage(bundle)
    with pytest.raises(UserError, match=message) as err:
        read_bundle(bundle)
    assert "\n" not in str(err.value)


def test_manifest_structure_errors(bundle):
    manifest = json.loads((bundle / MANIFEST).read_text())
    del manifest["speakers"]
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="manifest.json lacks speakers"):
        read_bundle(bundle)
    manifest["speakers"] = {"alice": 0}  # (an empty table is refused on its own)
    manifest["files"]["../outside.onnx"] = {"sha256": "0" * 64}
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="file outside the bundle"):
        read_bundle(bundle)
    with pytest.raises(UserError, match="bundle not found"):
        read_bundle(bundle.parent / "nope.rtsvc")


@pytest.mark.parametrize("damage, message", [
    (lambda b: flip_byte(b / "dit.onnx"), "dit.onnx sha256 mismatch"),
    (lambda b: (b / "vocoder.onnx").unlink(), "vocoder.onnx is missing"),
    (lambda b: edit_manifest(b, format_version=99), "unknown format_version 99"),
])
def test_cli_refuses_damaged_bundle_in_one_line(tmp_path, tiny_pretrained, capsys, monkeypatch, damage,
                                                message):
    bundle = make_fake_bundle(tmp_path / "voice.rtsvc")
    damage(bundle)
    wav = write_wav(tmp_path / "in.wav", harmonic_tone(0.3))
    code, _, err = run_cli(["convert", wav, tmp_path / "out.wav", "--model", bundle, "--pretrained-dir",
                            tiny_pretrained, "--f0", "pyworld"], capsys, monkeypatch)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_default_speaker_comes_first_and_commands_name_it(bundle):
    from rtsvc.voices.spec import describe_voice

    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["defaults"]["speaker"] = "bob"
    loaded = Bundle(bundle, manifest)
    assert list(loaded.speakers) == ["bob", "alice"] and loaded.speakers["bob"] == 1

    class Voice:
        speakers = list(loaded.speakers)

    assert describe_voice(Voice(), bundle) == f"voice: {bundle}, speaker bob (also: alice; --speaker)"
    chosen = describe_voice(Voice(), bundle, "alice")
    assert chosen == f"voice: {bundle}, speaker alice (also: bob; --speaker)"
    assert describe_voice(Voice(), None) == "voice: built-in DSP voice (no model)"
