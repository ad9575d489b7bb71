"""Clean mapped pages of a weights file are given back, and reading them again gives the same bytes."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import numpy as np
import pytest

from llamatrt.base.mapped_pages import _clean_mappings, release_clean_pages
from tests.conftest import resident_kb

SMAPS = """\
7f0000000000-7f0000004000 rw-p 00000000 08:01 12 /art/weights.data
Size:                 16 kB
Rss:                  16 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
VmFlags: rd wr mr mw me ac
7f0000004000-7f0000008000 rw-p 00004000 08:01 12 /art/weights.data
Rss:                   8 kB
Private_Dirty:         4 kB
Anonymous:             4 kB
7f0000008000-7f0000009000 r--p 00000000 08:01 13 /art/other.data
Private_Dirty:         0 kB
"""


def test_only_clean_mappings_of_the_file_are_chosen() -> None:
    assert _clean_mappings("/art/weights.data", SMAPS) == [(0x7F0000000000, 0x4000)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc and madvise")
def test_read_pages_are_released_and_read_back_unchanged(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 255, size=8 << 20, dtype=np.uint8)
    path = tmp_path / "weights.data"
    data.tofile(path)
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    view = np.frombuffer(mapped, dtype=np.uint8)
    assert int(view.sum()) == int(data.sum())  # every page read, so resident
    before = resident_kb(path)
    assert release_clean_pages(path) == len(data)
    assert resident_kb(path) < before // 4
    assert np.array_equal(view, data)  # read back from the file
    del view
    mapped.close()
