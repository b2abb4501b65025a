"""`rtsvc doctor` says plainly what is usable on this machine (no GPU here, CPU onnxruntime or not)."""

from rtsvc import doctor


def _onnx_rows(monkeypatch, gpu_here: bool, report, wheels=("onnxruntime",)):
    import rtsvc.backends.onnx_backend as onnx_backend

    monkeypatch.setattr(doctor, "_nvidia_gpu_present", lambda: gpu_here)
    monkeypatch.setattr(doctor, "_installed", lambda name: name in wheels)
    monkeypatch.setattr(onnx_backend, "provider_report", lambda: report)
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
