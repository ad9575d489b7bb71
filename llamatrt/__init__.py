"""llamatrt: Llama-family decoders from PyTorch to verified ONNX Runtime / TensorRT engines.

import llamatrt
with llamatrt.load("artifacts/smollm2-fp32") as llm:
    print(llm.generate("What is 2+2?", chat=True, max_new_tokens=32)[0].text)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llamatrt.runtime.llm import LLM

__version__ = "0.1.0"


def load(artifact: str | Path, backend: str = "onnxruntime", device: str | None = None) -> LLM:
    """Open an exported artifact on a backend (torch | onnxruntime | tensorrt)."""
    from llamatrt.runtime.llm import load as _load

    return _load(artifact, backend, device)
