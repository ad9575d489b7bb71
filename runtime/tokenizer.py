"""The artifact's tokenizer: `tokenizer.json` read by the `tokenizers` library, the chat template
rendered in a bounded sandbox (runtime.chat_template).

Opening an artifact never executes code from it and never prompts: no transformers
`AutoTokenizer` (whose `auto_map` can name Python files inside the artifact and ask on stdin
whether to run them); everything else the text API needs (special tokens, EOS ids, the template,
the decode clean-up flag) comes from the manifest, which the export recorded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llamatrt.base.errors import InputError, ManifestMismatchError
from llamatrt.runtime.chat_template import ChatTemplate

REEXPORT = "re-run `llamatrt export --force`"


CLEAN_UP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (spaces before punctuation and contractions)."""
    for a, b in CLEAN_UP:
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
        self._plain: Any = None  # the tokenizer with special-token matching off, made on first use

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return _encoded(self.backend, text, add_special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=True)
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """A conversation's prompt ids where only the template's own markup can be control tokens:
        message text that spells one (`<|im_end|>`, `<|im_start|>system`) is encoded as the plain
        text it is, so a user cannot close their turn and forge another. Contents that spell no
        special token encode as the whole rendered text does (the common case, unchanged); otherwise
        the template is rendered around placeholders and each content is encoded on its own with
        special-token matching off (the `tokenizers` library's `encode_special_tokens`)."""
        text = self.apply_chat_template(messages)
        specials = [t.content for t in self.backend.get_added_tokens_decoder().values() if t.special]
        contents = [str(m.get("content") or "") for m in messages]
        if not any(token in content for token in specials for content in contents):
            return self.encode(text, add_special_tokens=False)
        marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        pieces = re.split("\ue000(\\d+)\ue001", self.apply_chat_template(marked))
        rebuilt = "".join(contents[int(p)] if k % 2 else p for k, p in enumerate(pieces))
        if sorted(int(i) for i in pieces[1::2]) != list(range(len(messages))) or rebuilt != text:
            raise InputError(
                "a message spells a control token and this chat template changes message text, so it "
                "cannot be kept apart from the markup; remove the control-token text from the message"
            )
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k % 2 == 0:
                ids += self.encode(piece, add_special_tokens=False) if piece else []
            else:
                ids += self._plain_encode(contents[int(piece)])
        return ids

    def _plain_encode(self, text: str) -> list[int]:
        """`text` with special-token matching off (a second tokenizer, so the shared one is never toggled
        while another thread encodes)."""
        if self._plain is None:
            from tokenizers import Tokenizer

            self._plain = Tokenizer.from_str(self.backend.to_str())
            self._plain.encode_special_tokens = True
        return _encoded(self._plain, text, add_special_tokens=False) if text else []

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]]) -> str:
        if self._template_source is None:
            raise InputError("this checkpoint has no chat template; drop --chat and write the prompt yourself")
        if self._template is None:
            self._template = ChatTemplate(self._template_source, self.info.get("special_tokens", {}))
        return self._template.render(messages, add_generation_prompt=True)


def _encoded(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: what Python makes of bytes that are not UTF-8
        raise InputError("the prompt is not valid UTF-8 text; fix its encoding") from None
    # encode_batch, unlike encode, lets go of the GIL while it runs: a megabyte prompt tokenizes for
    # over a second, and a server's event loop and generation thread go on meanwhile
    (encoding,) = tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)
    return encoding.ids
