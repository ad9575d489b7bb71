"""llamatrt: Llama-family decoders from PyTorch to verified ONNX Runtime / TensorRT engines."""

from __future__ import annotations

__version__ = "0.1.0"
