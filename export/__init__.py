"""torch -> ONNX export of RIFT-SVC models into `.rtsvc` bundles, with numeric parity checks."""
