"""Offline journey: checkpoints -> one in-memory form -> ONNX -> backend engines (`qa-build`)."""
