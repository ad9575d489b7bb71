"""The export twin's mapped parameters: the same values back, pages given back, writes never lost."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from llamatrt.models.mapped_parameters import ALIGNMENT, MappedParameters
from tests.conftest import resident_kb


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "embed": torch.randn(1000, 96, generator=gen),
        "norm": torch.randn(7, generator=gen).to(torch.bfloat16),  # odd sizes: the next one is realigned
        "proj": torch.randn(33, 17, generator=gen).to(torch.float16),
        "head": torch.randn(96, 1000, generator=gen).t(),  # a transposed view is written as its values
    }


def test_the_same_values_come_back_aligned(tmp_path: Path) -> None:
    tensors = _tensors()
    mapped = MappedParameters(tmp_path / "p.bin", iter(tensors.items()))
    for name, tensor in tensors.items():
        got = mapped.tensors[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor), name
        assert got.data_ptr() % ALIGNMENT == 0, name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc and madvise")
def test_read_pages_are_given_back_and_written_ones_kept(tmp_path: Path) -> None:
    path = tmp_path / "p.bin"
    tensors = {"big": torch.randn(4 << 20, generator=torch.Generator().manual_seed(1))}  # 16 MiB
    mapped = MappedParameters(path, iter(tensors.items()))
    assert float(mapped.tensors["big"].sum()) == pytest.approx(float(tensors["big"].sum()), rel=1e-4)
    before = resident_kb(path)
    assert before > 12 << 10 and mapped.release() > 0
    assert resident_kb(path) < before // 4
    assert torch.equal(mapped.tensors["big"], tensors["big"])  # read back from the file
    # a quantized export's reference dequantizes in place: those pages are the process's own now,
    # and the map that holds them is left alone, so the write is never undone
    mapped.tensors["big"][:1000] = 7.0
    mapped.release()
    assert bool((mapped.tensors["big"][:1000] == 7.0).all())
    assert torch.equal(mapped.tensors["big"][1000:], tensors["big"][1000:])


@pytest.mark.parametrize("given_back", [True, False], ids=["pages-dropped", "in-place"])
def test_values_overwritten_through_the_file_are_read(tmp_path: Path, given_back: bool) -> None:
    """A quantized export's reference: dequantized weights written through the file stay pages that
    can be given back; where the map has pages of its own, the values are written in place too."""
    path = tmp_path / "p.bin"
    tensors = _tensors()
    mapped = MappedParameters(path, iter(tensors.items()))
    if not given_back:
        mapped.tensors["norm"][0] = 3.0  # a page of the process's own: the map is never dropped now
    new = {"embed": torch.full((1000, 96), 0.5), "proj": torch.ones(33, 17, dtype=torch.float16)}
    mapped.overwrite(iter(new.items()))
    for name, value in new.items():
        assert torch.equal(mapped.tensors[name], value), name
    assert torch.equal(mapped.tensors["head"], tensors["head"])
    if given_back and sys.platform.startswith("linux"):
        assert mapped.release() > 0
        assert torch.equal(mapped.tensors["embed"], new["embed"])  # faulted in from the file again
    with pytest.raises(ValueError, match="is not the mapped"):
        mapped.overwrite(iter([("proj", torch.ones(33, 17))]))
