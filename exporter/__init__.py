"""ONNX export (prefill + decode graphs, one weights file, a manifest) and TensorRT engine builds."""
