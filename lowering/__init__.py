"""How kimi ops map to Inductor, ONNX and TensorRT."""
