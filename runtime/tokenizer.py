"""The artifact's tokenizer: `tokenizer.json` read by the `tokenizers` library, the chat template
rendered in a bounded sandbox (runtime.chat_template).

Opening an artifact never executes code from it and never prompts: no transformers
`AutoTokenizer` (whose `auto_map` can name Python files inside the artifact and ask on stdin
whether to run them); everything else the text API needs (special tokens, EOS ids, the template,
the decode clean-up flag) comes from the manifest, which the export recorded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llamatrt.errors import InputError, ManifestMismatchError
from llamatrt.runtime.chat_template import ChatTemplate

REEXPORT = "re-run `llamatrt export --force`"


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (spaces before punctuation and contractions)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(a, b)
    return text


class ArtifactTokenizer:
    def __init__(self, folder: Path, info: Mapping[str, Any]) -> None:
        from tokenizers import Tokenizer

        path = folder / "tokenizer.json"
        try:
            self.backend = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for any unreadable file
            raise ManifestMismatchError(f"{path} is not a readable tokenizer ({str(e)[:120]}); {REEXPORT}") from e
        self.info = info
        self.clean_up_spaces = bool(info.get("clean_up_tokenization_spaces", False))
        source = info.get("chat_template")
        self._template_source = source if isinstance(source, str) and source else None
        self._template: ChatTemplate | None = None

    @property
    def has_chat_template(self) -> bool:
        return self._template_source is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if any("\ud800" <= ch <= "\udfff" for ch in text):  # what Python makes of bytes that are not UTF-8
            raise InputError("the prompt is not valid UTF-8 text; fix its encoding")
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=True)
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]]) -> str:
        if self._template_source is None:
            raise InputError("this checkpoint has no chat template; drop --chat and write the prompt yourself")
        if self._template is None:
            self._template = ChatTemplate(self._template_source, self.info.get("special_tokens", {}))
        return self._template.render(messages, add_generation_prompt=True)
