"""The second moments H = Σ xᵀx of every projection's inputs, and of the output head's, over
calibration text: what GPTQ (exporter.gptq) weighs each weight's rounding error by.

Computed one decoder layer at a time from the checkpoint, as the export streams its weights: the
calibration tokens' hidden states and one layer's parameters are all that is held, never the model.
Each layer runs on the previous layer's float outputs (GPTQ's reference code feeds each layer the
outputs of the layers already quantized; with float inputs every layer's H is known before any
weight is quantized, which lets the export quantize layers in any thread, in any order it asks).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from llamatrt.base.errors import InputError
from llamatrt.exporter.onnx_export import TRACING
from llamatrt.models.checkpoint import Checkpoint
from llamatrt.models.layers import DecoderLayer, RMSNorm
from llamatrt.models.mask import causal_mask
from llamatrt.models.rope import Rotary, inv_freq_from_config, rope_cos_sin

CALIBRATION_CONTEXT = 256  # tokens per calibration sequence
CALIBRATION_SEQUENCES = 32  # at most: 8,192 tokens, GPTQ's paper's 128 x 2,048 scaled to small models
SEQUENCES_PER_CALL = 8
# the projections GPTQ quantizes, by their input: each module's parameter is `{module}.weight`
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def calibration_ids(tokenizer: object, path: Path) -> list[list[int]]:
    """The text's tokens in sequences of CALIBRATION_CONTEXT (the last partial one dropped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read calibration text {path} ({e}); give a UTF-8 text file") from e
    if tokenizer is None:
        raise InputError("this checkpoint has no tokenizer to read calibration text with; drop --calibration")
    # verbose=False: a text longer than the tokenizer's model_max_length is cut into sequences below,
    # so transformers' warning about that length would be noise
    ids: list[int] = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # type: ignore[operator]
    if len(ids) < CALIBRATION_CONTEXT:
        raise InputError(
            f"calibration text {path} is {len(ids)} tokens; give at least {CALIBRATION_CONTEXT} "
            f"(a few thousand, up to {CALIBRATION_CONTEXT * CALIBRATION_SEQUENCES}, of the kind the model will read)"
        )
    count = min(len(ids) // CALIBRATION_CONTEXT, CALIBRATION_SEQUENCES)
    return [ids[i * CALIBRATION_CONTEXT : (i + 1) * CALIBRATION_CONTEXT] for i in range(count)]


def is_calibrated(name: str) -> bool:
    """Whether this is a decoder projection, whose H `Calibration.hessian` gives (the head's is
    `Calibration.head_hessian`)."""
    match = _LAYER.match(name)
    return match is not None and match.group(2) in PROJECTIONS


class Calibration:
    """H of each projection, layer by layer as they are asked for. Thread-safe: the export quantizes
    later layers in a background thread while it traces."""

    def __init__(self, checkpoint: Checkpoint, ids: Sequence[Sequence[int]], text: str = "") -> None:
        self.checkpoint, self.text = checkpoint, text
        config = checkpoint.config
        tokens = torch.tensor(ids, dtype=torch.long)
        # [sequences, context, hidden]: the rows read in the stored dtype, only they made fp32
        self.hidden = checkpoint.stored_parameter("model.embed_tokens.weight")[tokens].to(torch.float32)
        positions = torch.arange(tokens.shape[1]).expand(SEQUENCES_PER_CALL, -1)
        cos, sin = rope_cos_sin(inv_freq_from_config(config), positions, torch.float32)
        self.rotary = Rotary(cos, sin, positions)
        self.mask = causal_mask(positions, torch.ones_like(positions))
        self.next_layer = 0
        self.hessians: dict[str, torch.Tensor] = {}
        self.head: torch.Tensor | None = None
        self.lock = threading.Lock()

    def describe(self) -> dict[str, object]:
        """What the manifest records of it."""
        return {"text": self.text, "tokens": int(self.hidden.shape[0] * self.hidden.shape[1])}

    def hessian(self, name: str) -> torch.Tensor:
        """H of parameter `name` (is_calibrated). Layers are run in order up to its own; the H of a
        layer already passed is gone (the quantizer keeps what it made of it)."""
        match = _LAYER.match(name)
        assert match is not None and match.group(2) in PROJECTIONS, name
        layer = int(match.group(1))
        with self.lock:
            if layer < self.next_layer - 1:
                raise RuntimeError(f"{name}: calibration has moved past layer {layer}")
            while self.next_layer <= layer:
                self._run_next_layer()
            return self.hessians[name]

    @torch.no_grad()
    def head_hessian(self) -> torch.Tensor:
        """H of the output head's inputs (the final norm's outputs). The export asks for the head
        before the layers it streams, so the layers not yet run are run here on a copy of the hidden
        states, without their H: one more pass over the calibration text, a layer at a time."""
        with self.lock:
            if self.head is None:
                hidden = self.hidden.clone()
                for index in range(self.next_layer, self.checkpoint.config.num_layers):
                    self._forward(self._layer(index), hidden)
                config = self.checkpoint.config
                norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
                norm.load_state_dict({"weight": self.checkpoint.parameter("model.norm.weight")})
                x = norm(hidden).reshape(-1, config.hidden_size)
                self.head = (x.T @ x).to(torch.float64)
            return self.head

    def _layer(self, index: int) -> DecoderLayer:
        """Decoder layer `index` over the checkpoint's (mapped) tensors, read alone."""
        with torch.device("meta"):
            layer = DecoderLayer(self.checkpoint.config)
        prefix = f"model.layers.{index}."
        layer.load_state_dict({k: self.checkpoint.parameter(prefix + k) for k in layer.state_dict()}, assign=True)
        return layer

    def _forward(self, layer: DecoderLayer, hidden: torch.Tensor) -> None:
        """`hidden` [sequences, context, size] through `layer`, in place, SEQUENCES_PER_CALL at a time;
        never while a graph is traced (onnx_export.TRACING: the layer would take the trace's paths)."""
        config, cache_position = self.checkpoint.config, self.rotary.position_ids
        with TRACING:
            for start in range(0, hidden.shape[0], SEQUENCES_PER_CALL):
                x = hidden[start : start + SEQUENCES_PER_CALL]
                rows = x.shape[0]
                key, value = (torch.zeros(rows, config.num_kv_heads, x.shape[1], config.head_dim) for _ in range(2))
                rotary = Rotary(self.rotary.cos[:rows], self.rotary.sin[:rows], cache_position[:rows])
                hidden[start : start + rows] = layer(x, rotary, self.mask[:rows], cache_position[:rows], key, value)[0]

    @torch.no_grad()
    def _run_next_layer(self) -> None:
        """One layer on every sequence: its projections' H, and its outputs as the next layer's inputs."""
        prefix = f"model.layers.{self.next_layer}."
        layer = self._layer(self.next_layer)
        hessians: dict[str, torch.Tensor] = {}

        def accumulate(name: str) -> object:
            def hook(_: torch.nn.Module, inputs: tuple[torch.Tensor, ...], __: torch.Tensor) -> None:
                x = inputs[0].reshape(-1, inputs[0].shape[-1])
                moment = (x.T @ x).to(torch.float64)
                hessians[name] = hessians[name] + moment if name in hessians else moment

            return hook

        handles = [layer.get_submodule(p).register_forward_hook(accumulate(f"{prefix}{p}.weight")) for p in PROJECTIONS]
        self._forward(layer, self.hidden)
        for handle in handles:
            handle.remove()
        self.hessians = hessians
        self.next_layer += 1
