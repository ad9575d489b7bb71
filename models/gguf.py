"""GGUF file -> an HF folder in a cache, converted once.

transformers reads GGUF (undoing llama.cpp's q/k permutation and dequantizing) slowly (the README
gives the bundled model's time); the result is saved as safetensors + tokenizer under a key made of the
file's hash, so the next load is a plain HF-folder load of a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

from llamatrt.base.errors import CheckpointError
from llamatrt.base.termination import removed_on_termination

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """$LLAMATRT_CACHE, else ~/.cache/llamatrt."""
    return Path(os.environ.get("LLAMATRT_CACHE") or Path.home() / ".cache" / "llamatrt")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


COMPLETE = "complete.json"  # written last: the conversion's files and their sizes


def _complete(folder: Path) -> bool:
    """Whether a cached conversion is whole (every file it wrote is there at its size)."""
    try:
        sizes = json.loads((folder / COMPLETE).read_text())
        return all((folder / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, AttributeError):
        return False


def check_gguf(path: Path) -> None:
    """A readable, whole GGUF file (the gguf package parses its header and tensor table), or one line."""
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist; check the path")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{path} is not a GGUF file (bad magic); pass a .gguf from llama.cpp")
    try:
        import gguf

        gguf.GGUFReader(str(path))
    except ImportError as e:
        raise CheckpointError("reading GGUF needs the `gguf` package; pip install gguf") from e
    except (ValueError, IndexError, KeyError, OSError, struct.error) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({str(e).splitlines()[0][:100]}); re-download it") from e


def hf_dir_from_gguf(path: Path) -> Path:
    """The cached HF folder for this GGUF file, converting it on first use (atomic rename); a
    cached conversion that is not whole (a killed conversion, a damaged cache) is made again."""
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist; check the path")
    target = cache_root() / "gguf" / file_digest(path)[:24]
    if _complete(target):
        return target
    check_gguf(path)
    if target.exists():
        log.warning("the cached conversion of %s in %s is incomplete; converting it again", path.name, target)
        shutil.rmtree(target, ignore_errors=True)
    log.info("converting %s to safetensors (once; cached in %s)", path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        with removed_on_termination(tmp):
            _convert(path, tmp)
            sizes = {f.name: f.stat().st_size for f in tmp.iterdir() if f.is_file()}
            (tmp / COMPLETE).write_text(json.dumps(sizes))
            try:
                os.replace(tmp, target)
            except OSError:  # another process converted it first
                if not _complete(target):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(path: Path, out: Path) -> None:
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except ImportError as e:
        raise CheckpointError(
            f"reading GGUF needs the `gguf` and `accelerate` packages ({e}); pip install gguf accelerate"
        ) from e
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise CheckpointError(
            f"transformers cannot read {path.name} ({str(e).splitlines()[0]}); is it a Llama GGUF?"
        ) from e
    model.config.quantization_config = None  # the saved copy is plain float
    if hasattr(model, "hf_quantizer"):  # a transformers attribute whose presence varies by version
        model.hf_quantizer = None  # type: ignore[assignment]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
