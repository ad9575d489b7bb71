"""The one incremental detokenizer: streamed text equals the final text exactly, stop strings that
straddle tokens are found and never shown, multi-byte characters split across tokens arrive whole."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from llamatrt.runtime.detokenizer import TextStream, TokenizerPieces
from llamatrt.runtime.stopping import find_stop
from llamatrt.runtime.tokenizer import clean_up_tokenization
from tests.conftest import save_byte_level_bpe


class ListPieces:
    """Pieces given by a table (token -> text), as a tokenizer would decode them."""

    def __init__(self, table: dict[int, str]) -> None:
        self.table = table

    def step(self, token: int) -> str:
        return self.table[token]

    def flush(self) -> str:
        return ""


def stream(pieces, tokens: list[int], stops: tuple[str, ...]) -> tuple[list[str], str | None, TextStream]:
    text_stream, shown, stop = TextStream(pieces, stops), [], None
    for token in tokens:
        delta, stop = text_stream.push(token)
        shown.append(delta)
        if stop:
            return shown, stop, text_stream
    shown.append(text_stream.flush())
    return shown, None, text_stream


def test_a_stop_string_straddling_tokens_is_never_shown_and_the_tokens_before_it_are_kept() -> None:
    table = {1: "Hello", 2: " wor", 3: "ld ST", 4: "OP", 5: " after"}
    shown, stop, ts = stream(ListPieces(table), [1, 2, 3, 4, 5], ("STOP",))
    assert stop == "STOP" and "".join(shown) == "Hello world " and ts.kept == 2  # tokens 1, 2 end before it
    assert all("ST" not in piece for piece in shown)  # the prefix was held back, never streamed


def test_held_text_that_does_not_become_a_stop_is_released() -> None:
    table = {1: "a S", 2: "T", 3: "x", 4: " end"}
    shown, stop, _ = stream(ListPieces(table), [1, 2, 3, 4], ("STOP",))
    assert stop is None and "".join(shown) == "a STx end"
    assert shown[:3] == ["a ", "", "STx"]


def test_streamed_text_equals_whole_text_for_random_pieces_and_stops() -> None:
    rng = random.Random(0)
    alphabet = "ab<>|é日 \n"
    for _ in range(300):
        table = {i: "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3))) for i in range(12)}
        tokens = [rng.randrange(12) for _ in range(rng.randint(1, 30))]
        stops = tuple("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 3)))
        whole = "".join(table[t] for t in tokens)
        hit = find_stop(whole, stops)
        shown, stop, _ = stream(ListPieces(table), tokens, stops)
        assert "".join(shown) == (whole if hit is None else whole[: hit[0]])
        assert stop == (None if hit is None else hit[1])


@pytest.fixture(scope="module")
def byte_level_tokenizer(tmp_path_factory) -> object:
    """A byte-level BPE trained here (multi-byte characters split across tokens, as GPT-2's are)."""
    from tokenizers import Tokenizer

    path = save_byte_level_bpe(
        Path(tmp_path_factory.mktemp("bpe")), "hello world, this is a test of the tokenizer", ["<|end|>"]
    )
    return Tokenizer.from_file(str(path))


def test_multi_byte_characters_split_across_tokens_arrive_whole(byte_level_tokenizer) -> None:
    text = "héllo wörld 日本語 🎉 done"
    ids = byte_level_tokenizer.encode(text).ids
    assert len(ids) > len(text.encode()) // 2  # the rare characters really are several byte tokens
    shown, _, _ = stream(TokenizerPieces(byte_level_tokenizer), ids, ())
    assert "".join(shown) == byte_level_tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in shown)


def test_a_stop_string_inside_a_multi_byte_run(byte_level_tokenizer) -> None:
    ids = byte_level_tokenizer.encode("abc 日本語 xyz").ids
    shown, stop, _ = stream(TokenizerPieces(byte_level_tokenizer), ids, ("本",))
    assert stop == "本" and "".join(shown) == "abc 日"


def test_clean_up_spaces_streams_what_the_whole_text_cleans_to(byte_level_tokenizer) -> None:
    text = "hello , world . this isn ' t it ! yes ?"
    ids = byte_level_tokenizer.encode(text).ids
    shown, _, _ = stream(TokenizerPieces(byte_level_tokenizer, clean_up_tokenization), ids, ())
    assert "".join(shown) == clean_up_tokenization(byte_level_tokenizer.decode(ids))
