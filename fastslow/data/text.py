"""Caption token ids for the models that read words: a word-level tokenizer for the ``tiny`` text
tower (lowercased alphanumeric words), and the compact word-piece vocabulary the caption decoders
use on top of a pretrained text model (MiniLM's word pieces that occur in the training captions)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

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


class SpecialPieces(NamedTuple):
    """The ids a BERT-style text model (MiniLM) gives its special tokens."""

    pad: int
    cls: int
    sep: int
    unk: int

    @classmethod
    def of(cls, tokenizer: Any) -> SpecialPieces:
        """Read from a ``transformers`` tokenizer (``text_backbone().tokenizer``)."""
        return cls(
            pad=tokenizer.pad_token_id,
            cls=tokenizer.cls_token_id,
            sep=tokenizer.sep_token_id,
            unk=tokenizer.unk_token_id,
        )


class WordPieceVocabulary:
    """Compact ids for the text model's word pieces that occur in the training captions.

    The caption decoders predict a token from a softmax over the vocabulary, once per token of
    every (caption, image) pair scored; MiniLM's 30,522 pieces would make that the bulk of the
    cost, and most never occur in a captioning corpus. The compact ids keep
    :class:`WordTokenizer`'s layout (pad 0, bos 1, eos 2, unk 3, then the kept pieces sorted by
    the text model's id), so ``[CLS, pieces.., SEP, 0..]`` rows encode as ``[BOS, pieces.., EOS,
    PAD..]``, what the decoders read; :attr:`minilm_ids` maps each compact id back to the text
    model's (the rows of its word-embedding table to start from).
    """

    pad_id = WordTokenizer.pad_id
    bos_id = WordTokenizer.bos_id
    eos_id = WordTokenizer.eos_id
    unk_id = WordTokenizer.unk_id

    def __init__(self, pieces: Sequence[int], special: SpecialPieces) -> None:
        """``pieces``: the text model's ids of the kept word pieces, in compact-id order (ids start
        after the special tokens); ``special``: the text model's ids of its special tokens."""
        pieces = [int(p) for p in pieces]
        if len(set(pieces)) != len(pieces) or set(pieces) & set(special):
            raise ValueError("word pieces must be unique and must not include special tokens")
        self.special = SpecialPieces(*special)
        # Compact id order: pad, bos, eos, unk are [PAD], [CLS], [SEP], [UNK].
        specials = (self.special.pad, self.special.cls, self.special.sep, self.special.unk)
        self.minilm_ids = torch.tensor([*specials, *pieces], dtype=torch.long)
        # Dense lookup from the text model's ids; ids it does not cover are UNK.
        self._compact_id = torch.full((int(self.minilm_ids.max()) + 1,), self.unk_id)
        self._compact_id[self.minilm_ids] = torch.arange(len(self.minilm_ids))

    @classmethod
    def fit(
        cls, minilm_ids: torch.Tensor, special: SpecialPieces, min_count: int = 1
    ) -> WordPieceVocabulary:
        """Vocabulary of the pieces seen at least ``min_count`` times in the ``(N, L)`` text-model
        ids of the training captions (:attr:`fastslow.features.FeatureSet.caption_ids`), sorted by
        the text model's id (so the compact ids do not depend on caption order)."""
        ids = torch.as_tensor(minilm_ids).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("cannot fit a word-piece vocabulary on an empty caption list")
        pieces, counts = ids.unique(return_counts=True)  # sorted by id
        kept = (counts >= min_count) & ~torch.isin(pieces, torch.tensor(special))
        return cls(pieces[kept].tolist(), special)

    @property
    def vocab_size(self) -> int:
        return len(self.minilm_ids)

    def encode(self, minilm_ids: torch.Tensor) -> torch.LongTensor:
        """``(N, L)`` compact ids of ``(N, L)`` text-model ids laid out ``[CLS, pieces.., SEP,
        PAD..]``: [CLS] -> BOS, [SEP] -> EOS, [PAD] -> PAD, pieces outside the vocabulary -> UNK."""
        ids = torch.as_tensor(minilm_ids, dtype=torch.long)
        if ids.ndim != 2 or not bool((ids[:, 0] == self.special.cls).all()):
            raise ValueError("expected (N, L) text-model ids, each row starting with [CLS]")
        if not bool((ids == self.special.sep).sum(1).eq(1).all()):
            raise ValueError("expected exactly one [SEP] per row, after the caption's last piece")
        covered = ids < len(self._compact_id)
        compact = self._compact_id[ids.clamp(max=len(self._compact_id) - 1)]
        return torch.where(covered, compact, self.unk_id)

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor, tokenizer: Any) -> str:
        """The text of one compact-id sequence up to EOS, without BOS/PAD, the pieces joined back
        into words by the text model's ``tokenizer``; UNK shows as its unknown token."""
        tokens = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        if bool(((tokens < 0) | (tokens >= self.vocab_size)).any()):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        ends = (tokens == self.eos_id).nonzero()
        tokens = tokens[: int(ends[0]) if len(ends) else len(tokens)]
        tokens = tokens[(tokens != self.pad_id) & (tokens != self.bos_id)]
        return tokenizer.decode(self.minilm_ids[tokens].tolist())
