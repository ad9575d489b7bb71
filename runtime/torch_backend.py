"""The PyTorch backend: StaticLlama on the artifact's own weights file. The reference on any machine."""

from __future__ import annotations

import math
import mmap
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from llamatrt.errors import ManifestMismatchError
from llamatrt.exporter.manifest import TORCH_DTYPES, Manifest
from llamatrt.models.kv_cache import cache_names
from llamatrt.models.llama import StaticLlama
from llamatrt.runtime.backend import Backend


def state_dict_from_artifact(folder: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Read each parameter from the shared weights file at the place the manifest records."""
    state = {}
    with (folder / manifest.weights_file).open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for name, where in manifest.weights_map.items():
            count = math.prod(where["shape"])
            dtype = TORCH_DTYPES[where.get("dtype", manifest.dtype)]  # fp16 artifacts keep norm weights in fp32
            with warnings.catch_warnings():  # read-only mmap; we clone right away
                warnings.simplefilter("ignore", UserWarning)
                flat = torch.frombuffer(mm, dtype=dtype, count=count, offset=where["offset"]).clone()
            tensor = flat.view(where["shape"])
            tensor = tensor.t().contiguous() if where["transposed"] else tensor
            state[name] = tensor.to(TORCH_DTYPES[manifest.dtype])
            del flat
    if not state:
        raise ManifestMismatchError("the manifest has no weights map; re-run `llamatrt export` with this llamatrt")
    return state


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, folder: Path, manifest: Manifest, device: str = "cpu", model: StaticLlama | None = None) -> None:
        """Runs the artifact's own weights, or `model` (a StaticLlama from the checkpoint: `diff`'s
        middle rung) at the artifact's shapes."""
        super().__init__(folder, manifest, device)
        if model is None:
            model = StaticLlama.from_weights(manifest.config, state_dict_from_artifact(self.folder, manifest))
        self.model = model.to(device=self.device, dtype=TORCH_DTYPES[manifest.dtype]).eval()
        self.present_names = cache_names(manifest.config.num_layers, "present")
        self.past_names = cache_names(manifest.config.num_layers, "past")

    def _run(self, graph: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.model.full_logits = len(self.manifest.graphs[graph].outputs[0].shape) == 3
        with torch.inference_mode():
            out = self.model(
                feeds["input_ids"], feeds["position_ids"], feeds["cache_position"], feeds["attention_mask"],
                *(feeds[n] for n in self.past_names),
            )  # fmt: skip
        return {"logits": out[0], **dict(zip(self.present_names, out[1:], strict=True))}
