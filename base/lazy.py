"""GPU-only imports, on first use, with a one-line error that says what to install."""

from __future__ import annotations

from types import ModuleType

from llamatrt.base.errors import BackendUnavailable


def require_tensorrt(allow_rtx: bool = False, fix: str = "or use --backend onnxruntime") -> ModuleType:
    """`tensorrt` (or, where allowed, `tensorrt_rtx`, which builds engines on a CPU-only machine);
    `fix`: what the caller's user can do instead."""
    try:
        import tensorrt

        return tensorrt
    except ImportError:
        if allow_rtx:
            try:
                import tensorrt_rtx

                return tensorrt_rtx
            except ImportError:
                pass
    raise BackendUnavailable(
        f"TensorRT is not installed; on a GPU machine run `pip install 'llamatrt[gpu]'` (or `pip install tensorrt`), {fix}"
    )


def require_cuda(fix: str = "or use --backend onnxruntime") -> None:
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable(f"no CUDA device is visible; run on a GPU machine {fix}")
