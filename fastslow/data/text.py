"""A word-level tokenizer for the ``tiny`` text tower: lowercased alphanumeric words."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

_WORD = re.compile(r"[a-z0-9]+")


def split_words(caption: str) -> list[str]:
    """Lowercase and split on anything that is not a letter or digit."""
    return _WORD.findall(caption.lower())


class WordTokenizer:
    """Maps words to ids: ``[BOS, w1..wn, EOS, PAD...]``; words unseen at fit time become UNK."""

    pad_id = 0
    bos_id = 1
    eos_id = 2
    unk_id = 3
    special_tokens = ("<pad>", "<bos>", "<eos>", "<unk>")

    def __init__(self, words: Sequence[str]) -> None:
        """``words``: the vocabulary without special tokens, in id order (ids start after them)."""
        if len(set(words)) != len(words) or set(words) & set(self.special_tokens):
            raise ValueError("tokenizer words must be unique and must not include special tokens")
        self.words = list(words)
        self._id_of = {word: i for i, word in enumerate(self.special_tokens + tuple(self.words))}

    @classmethod
    def fit(cls, captions: Iterable[str], min_count: int = 1) -> WordTokenizer:
        """Vocabulary of the words seen at least ``min_count`` times in ``captions``, most frequent
        first (ties alphabetical, so the ids do not depend on caption order); others encode as UNK."""
        counts: Counter[str] = Counter()
        n_captions = 0
        for caption in captions:
            counts.update(split_words(caption))
            n_captions += 1
        if n_captions == 0:
            raise ValueError("cannot fit a tokenizer on an empty caption list")
        kept = [word for word, count in counts.items() if count >= min_count]
        return cls(sorted(kept, key=lambda word: (-counts[word], word)))

    @property
    def vocab_size(self) -> int:
        return len(self.special_tokens) + len(self.words)

    def encode(self, captions: Sequence[str], max_len: int | None = None) -> torch.LongTensor:
        """(B, L) ids padded to the longest caption; with ``max_len``, longer captions are cut to
        ``max_len`` tokens with EOS kept last, so a model always sees where the caption ends."""
        if isinstance(captions, str):
            raise TypeError("encode takes a sequence of captions, not a single string")
        if len(captions) == 0:
            raise ValueError("cannot encode an empty caption list")
        if max_len is not None and max_len < 2:
            raise ValueError(f"max_len must leave room for BOS and EOS (>= 2), got {max_len}")
        rows = []
        for caption in captions:
            word_ids = [self._id_of.get(word, self.unk_id) for word in split_words(caption)]
            if max_len is not None:
                word_ids = word_ids[: max_len - 2]
            rows.append([self.bos_id, *word_ids, self.eos_id])
        ids = torch.full((len(rows), max(len(row) for row in rows)), self.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        """The words of one id sequence up to EOS, without BOS/PAD; UNK shows as ``<unk>``."""
        tokens = ids.tolist() if isinstance(ids, (torch.Tensor, np.ndarray)) else list(ids)
        n_special = len(self.special_tokens)
        words = []
        for token in tokens:
            if token == self.eos_id:
                break
            if token in (self.pad_id, self.bos_id):
                continue
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token} is outside the vocabulary of size {self.vocab_size}")
            is_unknown = token == self.unk_id
            words.append(self.special_tokens[token] if is_unknown else self.words[token - n_special])
        return " ".join(words)

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state, so a fitted tokenizer can be cached next to a model."""
        return {"words": list(self.words)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> WordTokenizer:
        return cls(state["words"])
