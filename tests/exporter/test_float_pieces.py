"""The weights stream's float tensors made a block at a time (exporter.float_pieces): byte for byte
what the export makes of a parameter whole, in every stored form, in blocks smaller than a tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llamatrt.exporter import float_pieces
from llamatrt.exporter.export import _stored_float
from llamatrt.exporter.float_pieces import FloatPieces
from llamatrt.exporter.replicate import LayerTensor
from llamatrt.models.checkpoint import load_checkpoint

FORMS = [  # (checkpoint dtype, compute, stored, transposed)
    (torch.bfloat16, torch.float32, "float32", True),
    (torch.bfloat16, torch.float32, "float32", False),
    (torch.bfloat16, torch.float16, "float16", True),
    (torch.bfloat16, torch.float16, "float32", False),  # a half-precision graph's folded norm upcast
    (torch.float32, torch.float32, "float32", True),
    (torch.float16, torch.bfloat16, "bfloat16", True),
]


@pytest.mark.parametrize(("source", "compute", "stored", "transposed"), FORMS)
@pytest.mark.parametrize("block", [64, 1000, 1 << 21])  # smaller than a row, a few rows, whole tensors
def test_pieces_are_the_stored_form_of_the_parameter(
    source: torch.dtype,
    compute: torch.dtype,
    stored: str,
    transposed: bool,
    block: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(float_pieces, "BLOCK_ELEMENTS", block)
    params = {"w": (torch.randn(96, 40) * 3).to(source), "n": (torch.randn(40) + 1).to(source)}

    def read(name: str, buffer) -> torch.Tensor:  # type: ignore[no-untyped-def]
        value = params[name]
        held = buffer(value.numel() * value.element_size())[: value.numel() * value.element_size()]
        return held.view(value.dtype).view(value.shape).copy_(value)

    pieces = FloatPieces(read)
    for name in params:
        form = transposed and params[name].dim() == 2
        whole = _stored_float(params[name], LayerTensor(name, form, stored), compute)
        made = b"".join(bytes(piece) for piece in pieces.pieces(name, form, compute, getattr(torch, stored)))
        assert made == whole.tobytes(), (name, block)


def test_a_checkpoint_reads_fused_parameters_into_one_buffer(tmp_path: Path) -> None:
    from tests.conftest import tiny_hf_model

    tiny_hf_model("gqa-tied").save_pretrained(tmp_path / "m")
    checkpoint = load_checkpoint(tmp_path / "m")
    buffers: list[torch.Tensor] = []

    def buffer(nbytes: int) -> torch.Tensor:
        if not buffers or buffers[0].numel() < nbytes:
            buffers[:] = [torch.empty(nbytes, dtype=torch.uint8)]
        return buffers[0]

    for name in (
        "model.layers.1.self_attn.qkv_proj.weight",
        "model.layers.1.mlp.gate_up_proj.weight",
        "lm_head.weight",
    ):
        read = checkpoint.stored_parameter_into(name, buffer)
        assert read.data_ptr() == buffers[0].data_ptr()  # read in place: no copy, no concatenation
        assert torch.equal(read, checkpoint.stored_parameter(name))
        assert read.shape == checkpoint.parameter_shape(name)
