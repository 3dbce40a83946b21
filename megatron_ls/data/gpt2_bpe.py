"""GPT-2 byte-level BPE (``--tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt``).

How it works (Radford et al. 2019, and the released vocab/merges format):

1. Text is split into pre-tokens by GPT-2's pattern
   ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``.
   The standard-library ``re`` has no ``\\p{..}`` classes, so the letter/number classes are built once
   from ``unicodedata`` categories (L* and N*), and ``\\s`` is spelled out as the Unicode White_Space set
   (``re``'s own ``\\s`` would also match U+001C..U+001F, which GPT-2's pattern does not).
2. Each pre-token's UTF-8 bytes are mapped to printable characters by a fixed byte -> char table
   (printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100 upwards), so the vocab is
   a plain JSON string table.
3. Pairs of adjacent symbols are merged greedily, lowest merge rank first, until none is in the table.
"""
from __future__ import annotations

import functools
import json
import os
import re
import sys
import unicodedata
from typing import Sequence

from megatron_ls.data.tokenizer_base import Tokenizer, TokenizerError

__all__ = ["GPT2BPETokenizer", "bytes_to_unicode", "pretokenize_pattern"]

EOD_TOKEN = "<|endoftext|>"

# Unicode White_Space property (PropList.txt): what GPT-2's regex means by \s.
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 table from each byte value to a printable character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            # Non-printable bytes (controls, space, soft hyphen...) get characters from U+0100 on.
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _category_classes() -> dict[str, str]:
    """Regex character-class bodies for Unicode letters ("L") and numbers ("N"), from ``unicodedata``."""
    ranges: dict[str, list[list[int]]] = {"L": [], "N": []}
    category = unicodedata.category
    prev = None  # major class of the previous code point
    for cp in range(sys.maxunicode + 1):
        major = category(chr(cp))[0]
        if major in ranges:
            if major == prev:
                ranges[major][-1][1] = cp
            else:
                ranges[major].append([cp, cp])
        prev = major

    def body(spans: list[list[int]]) -> str:
        return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in spans)

    return {k: body(v) for k, v in ranges.items()}


@functools.lru_cache(maxsize=1)
def pretokenize_pattern() -> re.Pattern:
    """GPT-2's pre-tokenization pattern compiled for the standard-library ``re``."""
    classes = _category_classes()
    letters, numbers, ws = classes["L"], classes["N"], _WHITESPACE
    pattern = (
        r"'s|'t|'re|'ve|'m|'ll|'d"
        rf"| ?[{letters}]+"
        rf"| ?[{numbers}]+"
        rf"| ?[^{ws}{letters}{numbers}]+"
        rf"|[{ws}]+(?![^{ws}])"
        rf"|[{ws}]+"
    )
    return re.compile(pattern)


def _load_vocab(vocab_file: str) -> dict[str, int]:
    if not vocab_file or not os.path.isfile(vocab_file):
        raise TokenizerError(f"--vocab-file {vocab_file}: no such file")
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"--vocab-file {vocab_file}: not a JSON token->id table ({exc})") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) and v >= 0 for v in vocab.values()):
        raise TokenizerError(f"--vocab-file {vocab_file}: expected a JSON object mapping tokens to ids >= 0")
    if len(set(vocab.values())) != len(vocab):
        raise TokenizerError(f"--vocab-file {vocab_file}: two tokens share an id")
    return vocab


def _load_merges(merge_file: str, vocab: dict[str, int]) -> dict[tuple[str, str], int]:
    if not merge_file or not os.path.isfile(merge_file):
        raise TokenizerError(f"--merge-file {merge_file}: no such file")
    ranks: dict[tuple[str, str], int] = {}
    with open(merge_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line or (lineno == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not all(parts):
                raise TokenizerError(f"--merge-file {merge_file}:{lineno}: expected 'left right', got {line!r}")
            if parts[0] + parts[1] not in vocab:
                raise TokenizerError(
                    f"--merge-file {merge_file}:{lineno}: merge result {parts[0] + parts[1]!r} is not in the vocab"
                )
            ranks.setdefault((parts[0], parts[1]), len(ranks))
    return ranks


class GPT2BPETokenizer(Tokenizer):
    """GPT-2 byte-level BPE from a ``vocab.json`` and a ``merges.txt``; EOD is ``<|endoftext|>``."""

    def __init__(self, vocab_file: str, merge_file: str, make_vocab_size_divisible_by: int = 128,
                 tensor_model_parallel_size: int = 1) -> None:
        super().__init__(make_vocab_size_divisible_by, tensor_model_parallel_size)
        self.encoder = _load_vocab(vocab_file)
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        missing = [c for c in self.byte_encoder.values() if c not in self.encoder]
        if missing:
            raise TokenizerError(
                f"--vocab-file {vocab_file}: {len(missing)} of the 256 byte symbols are missing "
                f"(e.g. {missing[0]!r}); byte-level BPE cannot encode arbitrary text without them"
            )
        if EOD_TOKEN not in self.encoder:
            raise TokenizerError(f"--vocab-file {vocab_file}: no {EOD_TOKEN} token")
        self.bpe_ranks = _load_merges(merge_file, self.encoder)
        self._vocab_size = max(self.encoder.values()) + 1
        self._eod = self.encoder[EOD_TOKEN]
        self._pattern = pretokenize_pattern()
        self._cache: dict[str, tuple[str, ...]] = {}
        # The byte -> symbol translation as one str.translate table over latin-1 decoded bytes.
        self._byte_table = {b: c for b, c in self.byte_encoder.items()}

    def bpe(self, token: str) -> tuple[str, ...]:
        """Merge the byte symbols of one pre-token into BPE symbols."""
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word = list(token)
        ranks = self.bpe_ranks
        while len(word) > 1:
            # Find the adjacent pair with the lowest merge rank.
            best_rank, best = None, None
            for pair in zip(word, word[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best = r, pair
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            n = len(word)
            while i < n:
                if i < n - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        result = tuple(word)
        if len(self._cache) < 1_000_000:  # bounded: adversarial input must not exhaust memory
            self._cache[token] = result
        return result

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = []
        enc = self.encoder
        for piece in self._pattern.findall(text):
            symbols = piece.encode("utf-8").decode("latin-1").translate(self._byte_table)
            ids.extend(enc[s] for s in self.bpe(symbols))
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        try:
            text = "".join(self.decoder[int(i)] for i in ids if int(i) in self.decoder)
            data = bytes(self.byte_decoder[c] for c in text)
        except KeyError as exc:
            raise TokenizerError(f"GPT2BPETokenizer: vocab token contains non-byte symbol {exc}") from None
        return data.decode("utf-8", errors="replace")
