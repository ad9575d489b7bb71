"""Static-shape Llama in PyTorch: config, layers, checkpoint loading. Knows nothing of ONNX."""

from llamatrt.base.config import LlamaConfig, RopeScaling
from llamatrt.models.checkpoint import Checkpoint, load_checkpoint
from llamatrt.models.llama import StaticLlama

__all__ = ["Checkpoint", "LlamaConfig", "RopeScaling", "StaticLlama", "load_checkpoint"]
