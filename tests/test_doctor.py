"""`rtsvc doctor` says plainly what is usable on this machine (no GPU here, CPU onnxruntime or not)."""

from rtsvc import doctor


def _onnx_rows(monkeypatch, gpu_here: bool, report, wheels=("onnxruntime",)):
    import rtsvc.backends.providers as providers

    monkeypatch.setattr(doctor, "_nvidia_gpu_present", lambda: gpu_here)
    monkeypatch.setattr(doctor, "_installed", lambda name: name in wheels)
    monkeypatch.setattr(providers, "provider_report", lambda: report)
    return {row.name: row for row in doctor._onnx_providers()}


def test_no_gpu_is_reported_as_a_fact_not_a_fault(monkeypatch):
    report = [("tensorrt", True, False), ("cuda", True, False), ("cpu", True, True)]
    rows = _onnx_rows(monkeypatch, False, report)
    assert rows["cuda"].value == "CUDA: not available on this machine (no NVIDIA GPU)"
    assert rows["cuda"].ok is None and rows["tensorrt"].ok is None
    assert rows["cpu"].value == "usable (a session starts)" and rows["cpu"].ok is True
    assert all("listed but cannot start" not in row.value for row in rows.values())


def test_gpu_with_the_cpu_wheel_points_at_the_gpu_extra(monkeypatch):
    report = [("tensorrt", False, False), ("cuda", False, False), ("cpu", True, True)]
    rows = _onnx_rows(monkeypatch, True, report)
    assert "rtsvc[gpu]" in rows["cuda"].value and rows["cuda"].ok is False


def test_both_onnxruntime_wheels_installed_is_flagged(monkeypatch):
    rows = _onnx_rows(monkeypatch, False, [("cpu", True, True)], wheels=("onnxruntime", "onnxruntime-gpu"))
    assert rows["packages"].ok is False
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in rows["packages"].value


def _pretrained_without(tmp_path, *absent):
    """A pretrained folder that passes the layout checks, without the `absent` components."""
    from rtsvc.pretrained import LAYOUT

    root = tmp_path / "pretrained"
    for name in ("contentvec", "whisper"):
        if name not in absent:
            (root / LAYOUT[name]).mkdir(parents=True)
            (root / LAYOUT[name] / "config.json").write_text("{}")
    for name in ("vocoder", "rmvpe"):
        if name not in absent:
            (root / LAYOUT[name]).parent.mkdir(parents=True)
            (root / LAYOUT[name]).write_bytes(b"")
            if name == "vocoder":
                (root / LAYOUT[name]).parent.joinpath("config.json").write_text("{}")
    return root


def test_doctor_calls_missing_rmvpe_optional_and_says_what_it_blocks(tmp_path, monkeypatch):
    from rtsvc.features.f0_methods import F0Method

    monkeypatch.setattr(F0Method, "installed", lambda self: True)  # torchfcpe and pyworld here
    rows = {row.name: row for row in doctor._components(_pretrained_without(tmp_path, "rmvpe"))}
    rmvpe = rows["rmvpe (V2/V3)"]
    assert rmvpe.ok is None and rmvpe.value.startswith("optional, missing")
    assert "blocks --f0 rmvpe only" in rmvpe.value and "fcpe, pyworld" in rmvpe.value
    assert rows["--f0 rmvpe (default)"].ok is None and "missing" in rows["--f0 rmvpe (default)"].value
    assert rows["--f0 fcpe"].ok and rows["--f0 pyworld"].ok
    for family in ("V2", "V3"):  # ready, with the F0s that need no download, and no "missing rmvpe"
        row = rows[f"for {family} models"]
        assert row.ok and row.value.startswith("ready with --f0 fcpe or pyworld")
        assert "not the default --f0 rmvpe" in row.value
        assert "missing rmvpe:" not in row.value


def test_doctor_says_what_a_missing_required_part_blocks(tmp_path, monkeypatch):
    from rtsvc.features.f0_methods import F0Method

    monkeypatch.setattr(F0Method, "installed", lambda self: self.package != "torchfcpe")
    root = _pretrained_without(tmp_path, "whisper", "vocoder")
    rows = {row.name: row for row in doctor._components(root)}
    assert rows["contentvec (V2/V3)"].ok and rows["contentvec (V2/V3)"].value.startswith("present: ")
    assert rows["whisper (V2)"].ok is False and "blocks V2 models" in rows["whisper (V2)"].value
    vocoder = rows["vocoder (V2/V3)"]
    assert vocoder.ok is False and "a .rtsvc bundle carries its own" in vocoder.value
    assert rows["--f0 fcpe"].ok is None and "torchfcpe package is not installed" in rows["--f0 fcpe"].value
    assert rows["rmvpe (V2/V3)"].ok is True
    v2, v3 = rows["for V2 models"], rows["for V3 models"]
    assert not v2.ok and v2.value.startswith("missing whisper, vocoder: rtsvc download --family v2")
    assert not v3.ok and v3.value.startswith("missing vocoder: rtsvc download --family v3")
    assert "--pretrained-dir" in v3.value


def test_a_forgotten_pretrained_dir_is_named_in_the_message(tmp_path):
    import pytest

    from rtsvc.errors import UserError
    from rtsvc.pretrained import resolve_pretrained

    for need in (("contentvec",), ("vocoder",), ("rmvpe",)):
        with pytest.raises(UserError) as err:
            resolve_pretrained(tmp_path / "pretrained", need=need)
        assert "--pretrained-dir" in str(err.value) and "rtsvc download --to" in str(err.value), need
