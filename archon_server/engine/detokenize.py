"""Incremental detokenization and stop strings for one generated sequence.

Decoding token by token breaks multi-byte characters and byte-level BPE merges, so a
window of recent tokens is decoded and only the stable difference is released (the
prefix/read-offset scheme of TGI and vLLM).  Stop strings may span tokens: text that
could still become the start of a stop string is held back until it is clear, so the
streamed pieces always concatenate to the final text.
"""

from __future__ import annotations

import functools
import re
from typing import Any


def stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def find_stop(text: str, stops: list[str], search_from: int = 0) -> int:
    """Index of the earliest stop string in ``text[search_from:]`` (absolute), or -1."""
    hit = -1
    for s in stops:
        i = text.find(s, search_from)
        if i != -1 and (hit == -1 or i < hit):
            hit = i
    return hit


class IncrementalText:
    """Text of a growing token sequence with stop-string cutting and safe streaming."""

    def __init__(self, tokenizer: Any, stops: list[str] | None = None, min_tokens: int = 0):
        """``min_tokens``: stop strings count only in text that came with a token past this many (vLLM's rule:
        a stop string wholly inside the first ``min_tokens`` tokens' text never ends the sequence)."""
        self.tok = tokenizer
        self.min_tokens = min_tokens
        self.stops = [s for s in (stops or []) if s]
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.ids: list[int] = []
        self._prefix = 0  # window start for decoding
        self._read = 0  # tokens whose text is already in self.text
        self.text = ""
        self.emitted = 0  # characters already handed out by take()
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> bool:
        """Append a token; returns True when a stop string appeared (text is then cut before it)."""
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return False  # incomplete character: wait for more tokens
        before = len(self.text)
        self.text += new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self.ids)
        if self.stops and len(self.ids) > self.min_tokens:
            i = find_stop(self.text, self.stops, max(0, before - self.max_stop + 1))
            if i != -1:
                self.text = self.text[:i]
                self.stopped = True
                return True
        return False

    def piece_of(self, token: int) -> str:
        """The text ``token`` would add if it came next (what :meth:`add` would release, stop strings aside), without
        adding it: "" while it leaves a multi-byte character incomplete, the whole character when it completes one begun
        by the tokens before it.  A logprob entry's string for a token that decodes alone to U+FFFD (a byte-fallback
        piece): the sampled token's and each top alternative's, in the context of the tokens sampled so far."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode([*self.ids[self._prefix :], token])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        return new_text[len(prefix_text) :]

    def flush(self) -> None:
        """At the end: keep the text of tokens still held back, but not a character cut in the middle
        (a length limit reached inside a multi-byte character): its U+FFFD is dropped, as vLLM never
        releases an incomplete character either."""
        if self.stopped or self._read == len(self.ids):
            return
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        before = len(self.text)
        if len(new_text) > len(prefix_text):
            self.text += new_text[len(prefix_text) :].rstrip("\ufffd")
        self._prefix = self._read = len(self.ids)
        i = find_stop(self.text, self.stops, max(0, before - self.max_stop + 1)) if self.stops and len(self.ids) > self.min_tokens else -1
        if i != -1:
            self.text = self.text[:i]
            self.stopped = True

    def take(self, final: bool = False) -> str:
        """Text not yet handed out that can no longer turn into a stop string (all of it if ``final``)."""
        end = len(self.text)
        if not final and self.stops:
            end -= stop_holdback(self.text, self.stops)
        end = max(end, self.emitted)
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece


def token_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """The text each token of ``ids`` adds to their decoded text, by the incremental decoding streams use
    (:class:`IncrementalText`), so that ``"".join(pieces)`` is ``decode(ids, skip_special_tokens=True)``: a special token
    (a BOS) adds "", a token ending inside a multi-byte character (byte fallback) adds "" and the one completing it the
    whole character, and a SentencePiece word keeps its leading space.  Decoding each id alone gives none of these (an
    echoed prompt's ``text_offset`` drifted from its text)."""
    text = IncrementalText(tokenizer)
    pieces = []
    for tid in ids:
        before = len(text.text)
        text.add(tid)
        pieces.append(text.text[before:])
    before = len(text.text)
    text.flush()
    if pieces:
        pieces[-1] += text.text[before:]
    return pieces


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, char -> byte (``bytes_to_unicode`` inverted): printable bytes stand for
    themselves, the others for the code points from 256 up, in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer: Any, tid: int) -> list[int]:
    """The raw bytes a generated token stands for (OpenAI's ``bytes``: a character split over byte tokens is whole only
    when its tokens' bytes are put together): a byte-level BPE token (GPT-2, SmolLM2, Llama 3) through its byte
    alphabet, a SentencePiece byte-fallback token ``<0xF0>`` its byte, another SentencePiece token its text with
    ``▁`` as a space; a special token its name's UTF-8 (as vLLM fills ``bytes`` from the token string). A tokenizer
    without a vocabulary of strings: the UTF-8 of the token decoded alone."""
    try:
        piece = tokenizer.convert_ids_to_tokens(tid)
        special = tid in set(getattr(tokenizer, "all_special_ids", ()) or ())
        decoder = str(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", ""))
    except Exception:  # noqa: BLE001 - a minimal tokenizer (tests): the decoded text is all there is
        piece = None
    if not isinstance(piece, str):
        return list(tokenizer.decode([tid], skip_special_tokens=False).encode("utf-8", "replace"))
    if special:
        return list(piece.encode("utf-8"))
    m = _BYTE_TOKEN.fullmatch(piece)
    if m:
        return [int(m.group(1), 16)]
    if decoder.startswith("ByteLevel"):
        table = _byte_decoder()
        if all(c in table for c in piece):
            return [table[c] for c in piece]
    return list(piece.replace("\u2581", " ").encode("utf-8"))
