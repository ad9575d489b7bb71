"""Names fixed by the artifact contract: the files in an artifact folder and the graphs' tensors.

Tensor names are the ones optimum and onnxruntime-genai use, so users' tools recognise them.
"""

from __future__ import annotations

MANIFEST = "manifest.json"
WEIGHTS = "weights.data"
TOKENIZER_DIR = "tokenizer"
TIMING_CACHE = "timing.cache"
BUILD_LOG = "build.log"

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
CACHE_POSITION = "cache_position"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"
# The inputs that are not the cache, in graph order; the cache inputs follow them.
SMALL_INPUTS = (INPUT_IDS, POSITION_IDS, CACHE_POSITION, ATTENTION_MASK)
# A graph that packs tokens (DESIGN.md §1) takes three more, after the cache: the rows' tokens laid
# out (rows, width) and right-padded, it computes only the real ones, packed one after another.
PACKED_TOKENS = "packed_tokens"  # (packed,): the flat index b * width + j of each real token, in order
PADDED_TOKENS = "padded_tokens"  # (rows, width): the packed index of each (b, j); a pad: its row's last
QUERY_LENGTHS = "query_lengths"  # (rows,): the real tokens of each row (its first ones)
PACKING_INPUTS = (PACKED_TOKENS, PADDED_TOKENS, QUERY_LENGTHS)
# what a backend copies into its bound buffers each call (everything but the cache)
CALL_INPUTS = SMALL_INPUTS + PACKING_INPUTS


def past_key_name(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value_name(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key_name(layer: int) -> str:
    return f"present.{layer}.key"


def present_value_name(layer: int) -> str:
    return f"present.{layer}.value"


def is_cache(name: str) -> bool:
    return name.startswith(("past_key_values.", "present."))


def past_name_for(present_name: str) -> str:
    """`present.3.key` -> `past_key_values.3.key`: the buffer a present output aliases."""
    return present_name.replace("present.", "past_key_values.", 1)


def cache_names(num_layers: int, prefix: str = "past") -> list[str]:
    """Flat names in graph order: key0, value0, key1, value1, ..."""
    key, value = (past_key_name, past_value_name) if prefix == "past" else (present_key_name, present_value_name)
    return [n for i in range(num_layers) for n in (key(i), value(i))]
