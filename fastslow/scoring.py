"""A trained model's scores over a whole split: every (caption, image) pair, as a matrix.

Both return ``(captions, images)`` with higher = better, the layout :mod:`fastslow.metrics` reads;
a captioning Slow model's scores come corrected for each caption's prior likelihood.
"""

from __future__ import annotations

import numpy as np
import torch

from fastslow.inputs import FeatureImages
from fastslow.models.cross_attention import CrossAttentionModel, pair_scores, visual_tokens
from fastslow.models.dual_encoder import DualEncoder, embed_images, embed_texts


def dual_encoder_scores(model: DualEncoder, visual: np.ndarray | FeatureImages, texts: torch.Tensor, device: str) -> torch.Tensor:
    """``(captions, images)`` cosine similarities of the Fast model over a whole split
    (``data.visual[name]``, ``data.texts[name]``)."""
    return embed_texts(model, texts, device) @ embed_images(model, visual, device).T


def mean_input(visual: np.ndarray | FeatureImages) -> np.ndarray | FeatureImages:
    """A batch of one: the mean of a gallery's inputs, an image that shows nothing in particular.

    Frozen features: the mean feature maps and pooled features. Pixels: the mean in float pixels,
    not rounded to uint8: :func:`~fastslow.inputs.images_to_tensor` takes any numeric array and
    normalises it affinely, so this reads as the exact mean of the normalised images.
    """
    if isinstance(visual, FeatureImages):
        maps = [m.mean(0, keepdim=True, dtype=torch.float32) for m in visual.maps]
        pooled = None if visual.pooled is None else visual.pooled.mean(0, keepdim=True, dtype=torch.float32)
        return FeatureImages(maps, pooled, visual.memory_format)
    return np.asarray(visual).mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32)


def cross_attention_scores(
    model: CrossAttentionModel,
    visual: np.ndarray | FeatureImages,
    tokens: torch.Tensor,
    device: str,
    queries: np.ndarray | None = None,
) -> torch.Tensor:
    """``(queries, images)`` Slow scores of captions ``queries`` (all when None) against every image
    of ``visual`` (a split's images as the model reads them): the gallery's visual tokens once,
    then every pair.

    A captioning model's score (objectives ``bidirectional`` and ``forward``) comes corrected for
    the caption's prior: ``log p(t | v) - log p(t | v_mean)``, ``v_mean`` the gallery's
    :func:`mean_input`. Ranking captions for an image by likelihood alone favours short, generic
    captions whatever the image shows; the correction asks how much the image raises the
    caption's likelihood. It is a constant per caption (per row), so ranking images for a caption
    is unchanged. ``itm`` scores are returned as they are.
    """
    queries = np.arange(len(tokens)) if queries is None else np.asarray(queries)
    query_tokens = tokens[torch.as_tensor(queries)]
    gallery = visual_tokens(model, visual, device)
    everyone = torch.arange(len(visual)).expand(len(queries), len(visual))
    scores = pair_scores(model, gallery, query_tokens, everyone)
    if model.objective == "itm":  # a match logit, not a likelihood: no prior to remove
        return scores
    reference = visual_tokens(model, mean_input(visual), device)
    only_image = torch.zeros(len(queries), 1, dtype=torch.long)
    return scores - pair_scores(model, reference, query_tokens, only_image)
