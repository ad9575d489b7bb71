"""The checkpoint's tokenizer, its EOS ids (all of them) and its chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llamatrt.base.errors import CheckpointError


def load_tokenizer(folder: Path) -> Any:
    """The checkpoint's tokenizer, never running code from it: trust_remote_code=False refuses an
    `auto_map` to Python files in the folder instead of asking on stdin whether to run them."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except ValueError as e:
        if "custom code" in str(e) or "trust_remote_code" in str(e):
            raise CheckpointError(
                f"the tokenizer in {folder} asks to run its own Python code (auto_map), which "
                "llamatrt never does; save a standard tokenizer (tokenizer.json) into the "
                "checkpoint"
            ) from e
        raise CheckpointError(
            f"no usable tokenizer in {folder} ({str(e).splitlines()[0]}); save one with tokenizer.save_pretrained()"
        ) from e
    except (OSError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"no usable tokenizer in {folder} ({str(e).splitlines()[0]}); save one with tokenizer.save_pretrained()"
        ) from e


def eos_token_ids(folder: Path, tokenizer: Any, hf_config: dict[str, Any]) -> list[int]:
    """Union of the EOS ids in generation_config.json, config.json and the tokenizer."""
    ids: set[int] = set()
    gen = folder / "generation_config.json"
    sources = [hf_config.get("eos_token_id"), tokenizer.eos_token_id]
    if gen.is_file():
        sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    return sorted(ids)
