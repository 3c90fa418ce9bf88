"""Training batches of matched (image, caption) pairs and the evaluation query sets."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from fastslow.data.types import CaptionedImages
from fastslow.inputs import FeatureImages, model_input, text_input, trim_padding


class PairBatches:
    """One epoch of pairs: every image once, with one of its captions drawn at random.

    Deterministic in ``(seed, epoch)``, so a resumed training run sees the same batches. A batch
    holds ``images`` (what the image towers read: pixels of ``split``, or ``visual[indices]`` when
    given, e.g. frozen features), ``tokens`` (the captions' word ids, what caption decoders read),
    ``texts`` (what the dual encoder's text side reads: ``texts`` when given, else the tokens) and
    ``image_index``.
    """

    def __init__(
        self,
        split: CaptionedImages,
        tokens: torch.Tensor,
        batch_size: int,
        seed: int,
        epoch: int,
        visual: np.ndarray | FeatureImages | None = None,
        texts: torch.Tensor | None = None,
    ):
        rng = np.random.default_rng([seed, epoch])
        self.split = split
        self.tokens = tokens
        self.visual = split.images if visual is None else visual
        self.texts = tokens if texts is None else texts
        self.batch_size = min(batch_size, len(split))
        self.order = rng.permutation(len(split))
        captions_by_image = split.captions_by_image()
        self.caption_of = np.array([rng.choice(captions_by_image[i]) for i in range(len(split))])

    def __len__(self) -> int:
        return len(self.order) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for b in range(len(self)):
            images = self.order[b * self.batch_size : (b + 1) * self.batch_size]
            captions = self.caption_of[images]
            yield {
                "images": model_input(self.visual[images]),
                "tokens": trim_padding(self.tokens[captions]),
                "texts": text_input(self.texts[captions]),
                "image_index": torch.as_tensor(images),
            }


class TwinNegativeBatches(PairBatches):
    """:class:`PairBatches` whose pairs each carry one look-alike, ``negative_images`` (what the
    look-alike term of a captioning Slow model reads, :func:`fastslow.losses.look_alike_loss`):
    the image's twin when the pair's caption describes all of it (a ``full`` caption: the twin's
    differs from it in what the twin changes, an order or a direction), else a random other image
    (a partial caption may be as true of the twin). Deterministic in ``(seed, epoch)``."""

    def __init__(self, split: CaptionedImages, tokens: torch.Tensor, batch_size: int, seed: int, epoch: int,
                 visual: np.ndarray | FeatureImages | None = None):
        super().__init__(split, tokens, batch_size, seed, epoch, visual)
        rng = np.random.default_rng([seed, epoch, len(split)])
        images = np.arange(len(split))
        other = (images + rng.integers(1, max(2, len(split)), len(split))) % len(split)
        full = np.array([split.caption_kind[c] == "full" for c in self.caption_of])
        self.negative_of = np.where((split.twin >= 0) & full, split.twin, other)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in super().__iter__():
            batch["negative_images"] = model_input(self.visual[self.negative_of[batch["image_index"].numpy()]])
            yield batch


def headline_queries(split: CaptionedImages, captions_per_image: int) -> np.ndarray:
    """Indices of the captions every method is scored on: the first ``n`` of each image's captions,
    in rounds (every image's first caption, then every image's second, ...).

    The Slow model scores each (query, image) pair, so the comparable evaluation may use fewer
    queries than the split has captions; every method's ``headline`` row uses this same set. In
    rounds, a prefix of it (what the costlier Slow ablations score) still spans as many images as
    it has queries, up to the gallery's size.
    """
    by_image = split.captions_by_image()
    rounds = [[c[r] for c in by_image if len(c) > r] for r in range(captions_per_image)]
    return np.asarray([q for captions in rounds for q in captions], dtype=np.int64)
