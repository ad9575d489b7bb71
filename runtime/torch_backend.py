"""The PyTorch backend: StaticLlama on the artifact's own weights file. The reference on any machine."""

from __future__ import annotations

import math
import mmap
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from llamatrt.base.artifact import names
from llamatrt.base.artifact.manifest import GraphSpec, Manifest
from llamatrt.base.artifact.precision import torch_dtype
from llamatrt.base.artifact.reader import inside
from llamatrt.base.errors import InputError, ManifestMismatchError
from llamatrt.models.llama import StaticLlama
from llamatrt.runtime.backend import Backend


def state_dict_from_artifact(folder: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Read each parameter from the shared weights file at the place the manifest records."""
    state = {}
    compute = torch_dtype(manifest.dtype)
    with (
        inside(folder, manifest.weights_file, "weights file").open("rb") as f,
        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm,
    ):
        for name, where in manifest.weights_map.items():
            count = math.prod(where["shape"])
            dtype = torch_dtype(where.get("dtype", manifest.dtype))  # fp16 artifacts keep norm weights in fp32
            if where["offset"] + count * dtype.itemsize > len(mm):
                raise ManifestMismatchError(
                    f"weights map entry {name!r} reaches past the end of the weights file; "
                    "re-run `llamatrt export --force`"
                )
            with warnings.catch_warnings():  # read-only mmap; we clone right away
                warnings.simplefilter("ignore", UserWarning)
                flat = torch.frombuffer(mm, dtype=dtype, count=count, offset=where["offset"]).clone()
            tensor = flat.view(where["shape"])
            tensor = tensor.t().contiguous() if where["transposed"] else tensor
            state[name] = tensor.to(compute)
            del flat
    if not state:
        raise ManifestMismatchError("the manifest has no weights map; re-run `llamatrt export` with this llamatrt")
    return state


class TorchBackend(Backend):
    name = "torch"
    reads_graph_files = False  # it runs the model on the weights file, never the .onnx files
    # It runs the model, not the graph: any form's shapes will do (a quantized artifact from GGUF
    # blocks has only the ONNX Runtime form), on any weights (quantized ones dequantized).
    attention_forms = ("portable", "onnxruntime")

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        device: str = "cpu",
        check_feeds: bool = True,
        model: StaticLlama | None = None,
        after_run: Callable[[], object] = lambda: None,
    ) -> None:
        """Runs the artifact's own weights, or `model` (a StaticLlama from the checkpoint: `diff`'s
        middle rung, and export validation's reference) at the artifact's shapes. `after_run` runs
        after each call (export validation gives back the pages of its reference's mapped weights,
        so a call holds what it reads, not every page the calls before it read)."""
        self.after_run = after_run
        if model is None and manifest.quantization:
            raise InputError(
                f"the torch backend runs float weights; this artifact's are {manifest.quantization['scheme']} "
                "(MatMulNBits): pass --backend onnxruntime"
            )
        super().__init__(folder, manifest, device, check_feeds)
        if model is None:
            model = StaticLlama.from_weights(manifest.config, state_dict_from_artifact(self.folder, manifest))
        self.model = model.to(device=self.device, dtype=torch_dtype(manifest.dtype)).eval()
        self.past_names = names.cache_names(manifest.config.num_layers, "past")
        self.present_names = names.cache_names(manifest.config.num_layers, "present")

    def _run(self, graph: GraphSpec, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            out = self.model(
                feeds[names.INPUT_IDS],
                feeds[names.POSITION_IDS],
                feeds[names.CACHE_POSITION],
                feeds[names.ATTENTION_MASK],
                *(feeds[n] for n in self.past_names),
                full_logits=graph.full_logits,
            )
        self.after_run()
        return {names.LOGITS: out[0], **dict(zip(self.present_names, out[1:], strict=True))}
