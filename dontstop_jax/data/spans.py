"""Span (entity) masking: occurrences of listed terms ("tumor necrosis factor") are masked as one unit.

Why at load time: the prepared corpus stays as it is (no re-tokenizing, no new cache format), and a term list
can change between runs. Each term is tokenized twice: mid-text (" term", the byte-level "Ġ" form) and at a
document start ("term", matched only right after a special token, i.e. after `</s>` or `<s>`). An occurrence
must end at a word boundary (the next token starts a word, is special or is past the row's end), so
"factor" does not match the head of "factors". Matches never contain a special token, so they never cross a
document boundary. Overlapping matches merge into one span.

Matching is vectorised over the [B, T] block: a polynomial hash (uint64, wrapping) of every window of each
term length, built incrementally over the lengths, screened by a bit table of all term hashes (one gather),
looked up in the sorted hashes of the terms of that length, and confirmed token by token, so thousands of
terms cost a few array passes per batch.

Each span is one masking unit with probability `rate` (drawn per span and row from the row's generator),
otherwise its tokens stay ordinary words (whole words with whole-word masking, single tokens without). The
per-row budget of `mask_tokens` is unchanged: units are taken while their tokens fit in it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
from transformers import PreTrainedTokenizerFast

from dontstop_jax import files
from dontstop_jax.data.masking import word_start_table
from dontstop_jax.data.tokenizer import encode_plain
from dontstop_jax.errors import UserError

_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the window hash
_FILTER_BITS = 20  # a bit table of this many hash bits rules out almost every window before the sorted lookup


def load_terms(path: str) -> list[str]:
    """The non-blank lines of the term file `path` (local or in a bucket), stripped; one-line errors when the
    file is missing or lists nothing."""
    where = files.path(path)
    if not where.is_file():
        raise UserError(f"data.span_masking.terms={path!r}: no such file; give a text file with one term per line")
    terms = [line.strip() for line in where.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not terms:
        raise UserError(
            f"data.span_masking.terms={path!r} lists no terms; put one term per line, or set "
            "terms='' to turn span masking off"
        )
    return terms


class SpanMasker:
    """Finds the listed terms in token blocks and turns them into masking units (see the module docstring)."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerFast, terms: Sequence[str], rate: float, special_ids: Mapping[str, int]
    ) -> None:
        if not 0 <= rate <= 1:
            raise UserError(f"data.span_masking.rate={rate} must be in [0, 1]")
        self.rate = rate
        self.word_starts = word_start_table(tokenizer)
        self.special = np.zeros(len(self.word_starts), bool)
        self.special[[i for i in special_ids.values() if i < len(self.special)]] = True
        patterns = _patterns(
            encode_plain(tokenizer, [f" {t}" for t in terms]), encode_plain(tokenizer, list(terms)), self.special
        )
        self.groups = [_Group(length, seqs) for length, seqs in sorted(patterns.items())]
        self.screen = np.zeros(1 << _FILTER_BITS, bool)
        for group in self.groups:
            self.screen[_screen_key(group.hashes)] = True
        self.summary = {
            "terms": len(terms),
            "patterns": sum(len(g.hashes) for g in self.groups),
            "rate": rate,
            "sha256": hashlib.sha256("\n".join(terms).encode()).hexdigest()[:16],
        }

    def spans(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first, inside): bool [B, T], True at the first token of each (merged) span and at its other tokens."""
        batch, length = tokens.shape
        opened = np.zeros((batch, length + 1), np.int32)  # +1 where a match covers from, -1 after its end
        inner = np.zeros((batch, length + 1), np.int32)  # the same from a match's second token on
        hashes = np.zeros((batch, length), np.uint64)
        tokens64 = tokens.astype(np.uint64)
        grown = 0
        for group in self.groups:
            if group.length > length:
                break
            for k in range(grown, group.length):  # hashes[:, t] = hash of tokens[t : t + k + 1]
                hashes = hashes[:, : length - k] * _BASE + tokens64[:, k:]
            grown = group.length
            rows, cols = np.nonzero(self.screen[_screen_key(hashes)])
            rows, cols = group.find(tokens, rows, cols, hashes[rows, cols], self.word_starts, self.special)
            ends = cols + group.length
            np.add.at(opened, (rows, cols), 1)
            np.add.at(opened, (rows, ends), -1)
            np.add.at(inner, (rows, cols + 1), 1)
            np.add.at(inner, (rows, ends), -1)
        covered = np.cumsum(opened, axis=1)[:, :length] > 0
        inside = np.cumsum(inner, axis=1)[:, :length] > 0
        return covered & ~inside, inside

    def word_starts_with_spans(self, tokens: np.ndarray, starts: np.ndarray, coins: np.ndarray) -> np.ndarray:
        """`starts` (bool [B, T] word starts) with each kept span (coin < rate at its first token) made one
        word: a start at its first token, none inside it."""
        first, inside = self.spans(tokens)
        kept_first = first & (coins < self.rate)
        columns = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
        own_first = np.maximum.accumulate(np.where(first, columns, 0), axis=1)  # an inside token's span start
        kept = kept_first | (inside & np.take_along_axis(kept_first, own_first, axis=1))
        return np.where(kept, first, starts)


def _screen_key(hashes: np.ndarray) -> np.ndarray:
    """Top bits of a window hash, mixed once more: the last token only reaches a window hash's low bits."""
    return ((hashes * _BASE) >> np.uint64(64 - _FILTER_BITS)).astype(np.intp)


def _patterns(
    mid_text: list[list[int]], doc_start: list[list[int]], special: np.ndarray
) -> dict[int, dict[tuple, bool]]:
    """{length: {token sequence: only after a special token}}; a sequence that is also a mid-text form
    matches anywhere. A term that tokenizes to a special token ("<mask>") is left out: spans hold text only."""
    patterns: dict[int, dict[tuple, bool]] = {}
    for ids, after_special in [(m, False) for m in mid_text] + [(d, True) for d in doc_start]:
        if ids and not special[ids].any():
            seqs = patterns.setdefault(len(ids), {})
            seqs[tuple(ids)] = seqs.get(tuple(ids), True) and after_special
    return patterns


class _Group:
    """The term patterns of one token length, sorted by window hash."""

    def __init__(self, length: int, seqs: dict[tuple, bool]) -> None:
        self.length = length
        tokens = np.array(list(seqs), np.uint64).reshape(len(seqs), length)
        hashes = np.zeros(len(seqs), np.uint64)
        for k in range(length):
            hashes = hashes * _BASE + tokens[:, k]
        order = np.argsort(hashes)
        self.hashes, self.tokens = hashes[order], tokens[order].astype(np.int64)
        self.after_special = np.array(list(seqs.values()), bool)[order]
        if len(np.unique(self.hashes)) < len(self.hashes):
            raise UserError(f"two span-masking terms of {length} tokens share a window hash; drop one of them")

    def find(
        self,
        tokens: np.ndarray,
        rows: np.ndarray,
        cols: np.ndarray,
        hashes: np.ndarray,
        word_starts: np.ndarray,
        special: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The (rows, cols) of the candidate windows of this length (window hashes `hashes`) where one of the
        group's patterns starts in `tokens`."""
        index = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
        hit = self.hashes[index] == hashes
        rows, cols, pattern = rows[hit], cols[hit], index[hit]
        window = tokens[rows[:, None], cols[:, None] + np.arange(self.length)]
        ends = cols + self.length
        after = np.where(ends < tokens.shape[1], tokens[rows, np.minimum(ends, tokens.shape[1] - 1)], -1)
        ok = (window == self.tokens[pattern]).all(axis=1) & ((after < 0) | word_starts[after])
        ok &= ~self.after_special[pattern] | ((cols > 0) & special[tokens[rows, np.maximum(cols - 1, 0)]])
        return rows[ok], cols[ok]
