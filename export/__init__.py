"""Exporters (ONNX, TensorRT) and their runtimes."""
