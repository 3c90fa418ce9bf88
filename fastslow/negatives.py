"""Hard negatives for the Slow model, mined with the Fast model, and the batches that carry them.

A Slow model learns to tell an image's caption from look-alikes only if it meets look-alikes: a
random other image of Flickr8k rarely resembles the caption's, so ALBEF and BLIP draw their
matching negatives from what the contrastive (Fast) model finds similar. Here the trained dual
encoder's scores over the training split give, per caption, its ``pool`` most similar other
images, and per image its ``pool`` most similar other captions. The caption decoders'
:class:`NegativeBatches` draw ``hard`` of them per pair each epoch, as extra images and captions;
the matching model's :class:`LookAlikeBatches` put groups of look-alikes into one batch instead,
so the batch's other pairs are its negatives, hard and random ones together, at no extra cost.

A candidate is no negative if it is a positive under another name: an image is dropped from a
caption's pool when one of its own captions says the same thing (same words after lower-casing and
dropping punctuation), and a caption is dropped from an image's pool when it says what one of the
image's captions says.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fastslow.data.types import CaptionedImages
from fastslow.inputs import FeatureImages, model_input, trim_padding


def normalised_caption(caption: str) -> str:
    """A caption's words, lower-cased, without punctuation: two captions that say the same thing."""
    return " ".join(re.findall(r"[a-z0-9]+", caption.lower()))


@dataclass
class NegativePools:
    """Per caption, its ``(n_captions, pool)`` most Fast-similar other images (``images``); per
    image, its ``(n_images, pool)`` most Fast-similar other captions (``captions``). ``-1`` pads a
    row whose candidates were dropped as positives under another name."""

    images: np.ndarray
    captions: np.ndarray


def mine_pools(scores: torch.Tensor, split: CaptionedImages, pool: int) -> NegativePools:
    """Negative pools from a Fast model's ``(captions, images)`` scores over ``split``."""
    caption_image = np.asarray(split.caption_image)
    texts = [normalised_caption(c) for c in split.captions]
    same_text: dict[str, set[int]] = {}
    for caption, text in enumerate(texts):
        same_text.setdefault(text, set()).add(int(caption_image[caption]))
    # Images that own a caption with the same words as caption c (its own image among them).
    positives_of_caption = [same_text[text] for text in texts]
    texts_of_image = [set() for _ in range(len(split))]
    for caption, text in enumerate(texts):
        texts_of_image[caption_image[caption]].add(text)
    # Candidates beyond the pool size make room for the dropped ones.
    extra = 1 + max(len(p) for p in positives_of_caption)
    ranked_images = scores.topk(min(pool + extra, scores.shape[1]), dim=1).indices.numpy()
    images = _keep_first(ranked_images, pool, lambda c, i: i not in positives_of_caption[c])
    most_captions = max(len(texts_of_image[i]) for i in range(len(split)))
    ranked_captions = scores.T.topk(min(pool + 3 * most_captions, scores.shape[0]), dim=1).indices.numpy()
    captions = _keep_first(
        ranked_captions, pool,
        lambda i, c: caption_image[c] != i and texts[c] not in texts_of_image[i],
    )
    return NegativePools(images=images, captions=captions)


def _keep_first(ranked: np.ndarray, pool: int, keep) -> np.ndarray:
    """Per row, the first ``pool`` entries of ``ranked`` that ``keep(row, entry)`` accepts, padded
    with -1."""
    chosen = np.full((len(ranked), pool), -1, dtype=np.int64)
    for row, candidates in enumerate(ranked):
        kept = [int(c) for c in candidates if keep(row, int(c))][:pool]
        chosen[row, : len(kept)] = kept
    return chosen


def draw_negatives(pool: np.ndarray, hard: int, rng: np.random.Generator) -> np.ndarray:
    """``(rows, hard)`` negatives drawn without replacement from each row's pool (its -1 padding
    never drawn; a row whose pool holds fewer repeats some)."""
    drawn = np.empty((len(pool), hard), dtype=np.int64)
    for row, candidates in enumerate(pool):
        candidates = candidates[candidates >= 0]
        drawn[row] = rng.choice(candidates, size=hard, replace=len(candidates) < hard)
    return drawn


def draw_captions(split: CaptionedImages, rng: np.random.Generator) -> np.ndarray:
    """One caption per image of ``split``, drawn at random among its own: an epoch's pairs."""
    by_image = split.captions_by_image()
    return np.array([rng.choice(by_image[i]) for i in range(len(split))])


class MinedEpoch:
    """One epoch of matched pairs with negatives mined by the Fast model, deterministic in
    ``(seed, epoch)``: what :class:`NegativeBatches` and :class:`LookAlikeBatches` share. Each
    kind's ``_arrange`` sets ``order`` (the images, in batch order) and ``caption_of`` (each image's
    caption this epoch) from ``pools``, ``hard`` and the epoch's random generator."""

    def __init__(
        self,
        split: CaptionedImages,
        texts: torch.Tensor,
        visual: np.ndarray | FeatureImages,
        pools: NegativePools,
        *,
        hard: int,
        batch_size: int,
        seed: int,
        epoch: int,
    ):
        self.texts, self.visual = texts, visual
        self.batch_size = min(batch_size, len(split))
        self._arrange(split, pools, hard, np.random.default_rng([seed, epoch]))

    def _arrange(self, split: CaptionedImages, pools: NegativePools, hard: int, rng: np.random.Generator) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.order) // self.batch_size


class NegativeBatches(MinedEpoch):
    """One epoch of matched pairs (every image once, with one of its captions drawn at random),
    each with ``hard`` negatives drawn from its pools: images for its caption, captions for its
    image. Random negatives come from the batch itself (another pair's image or caption is a
    random one: the order is shuffled), so they cost no extra image.

    Deterministic in ``(seed, epoch)``. A batch holds ``images`` and ``tokens`` (the B pairs, as the
    image tower and the Slow model read them), ``negative_images`` (B x M images, row-major: pair
    b's are rows b*M to b*M+M-1) and ``negative_tokens`` (B x M captions, the same layout),
    ``all_images`` and ``all_tokens`` (the pairs' then the negatives', one tensor each: the first
    four are views of them) and ``image_index``.
    """

    def _arrange(self, split: CaptionedImages, pools: NegativePools, hard: int, rng: np.random.Generator) -> None:
        self.order = rng.permutation(len(split))
        self.caption_of = draw_captions(split, rng)
        self.negative_images = draw_negatives(pools.images[self.caption_of], hard, rng)
        self.negative_captions = draw_negatives(pools.captions, hard, rng)

    def __iter__(self) -> Iterator[dict]:
        for b in range(len(self)):
            images = self.order[b * self.batch_size : (b + 1) * self.batch_size]
            pairs = len(images)
            image_rows = np.concatenate([images, self.negative_images[images].reshape(-1)])
            caption_rows = np.concatenate(
                [self.caption_of[images], self.negative_captions[images].reshape(-1)]
            )
            visual = model_input(self.visual[image_rows])
            texts = trim_padding(self.texts[caption_rows])
            yield {
                "images": visual[:pairs],
                "tokens": texts[:pairs],
                "negative_images": visual[pairs:],
                "negative_tokens": texts[pairs:],
                "all_images": visual,
                "all_tokens": texts,
                "image_index": torch.as_tensor(images),
            }


def look_alike_order(
    caption_of: np.ndarray, pools: NegativePools, group: int, rng: np.random.Generator
) -> np.ndarray:
    """Every image once, in groups of up to ``group`` Fast look-alikes: each group starts at the
    next image of a random order not yet placed (its anchor) and takes the first images of the
    anchor's caption's pool (``caption_of[anchor]``) not yet placed. Consecutive images of the
    result then tend to be each other's hard negatives."""
    placed = np.zeros(len(caption_of), dtype=bool)
    order = []
    for anchor in rng.permutation(len(caption_of)):
        if placed[anchor]:
            continue
        members = [int(anchor)]
        for candidate in pools.images[caption_of[anchor]]:
            if len(members) == group:
                break
            if candidate >= 0 and not placed[candidate] and candidate not in members:
                members.append(int(candidate))
        placed[members] = True
        order.extend(members)
    return np.asarray(order)


class LookAlikeBatches(MinedEpoch):
    """One epoch of matched pairs (every image once, with one of its captions drawn at random) in
    batches that carry their own hard negatives: groups of ``1 + hard`` Fast look-alikes
    (:func:`look_alike_order`), so every other pair of a batch is a negative, some of them hard,
    in both directions (a look-alike image for a caption, a look-alike's caption for an image),
    at no cost beyond the batch itself.

    Deterministic in ``(seed, epoch)``. A batch holds ``images`` and ``tokens`` (the B pairs, as the
    image tower and the Slow model read them) and ``image_index``; the last, incomplete batch is
    dropped (each epoch orders the images anew, so no image is left out every epoch).
    """

    def _arrange(self, split: CaptionedImages, pools: NegativePools, hard: int, rng: np.random.Generator) -> None:
        self.caption_of = draw_captions(split, rng)
        self.order = look_alike_order(self.caption_of, pools, 1 + hard, rng)

    def __iter__(self) -> Iterator[dict]:
        for b in range(len(self)):
            images = self.order[b * self.batch_size : (b + 1) * self.batch_size]
            yield {
                "images": model_input(self.visual[images]),
                "tokens": trim_padding(self.texts[self.caption_of[images]]),
                "image_index": torch.as_tensor(images),
            }
