"""Where the networks run: the `Backend` interface (`base.py`), PyTorch (`torch_backend.py`) and
ONNX Runtime over an exported `.rtsvc` bundle (`onnx_backend.py`, `bundle.py`)."""
