"""A trained model's scores over a whole split: every (caption, image) pair, as a matrix.

Both return ``(captions, images)`` with higher = better, the layout :mod:`fastslow.metrics` reads.
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


def cross_attention_scores(
    model: CrossAttentionModel, visual: np.ndarray | FeatureImages, tokens: torch.Tensor, device: str, queries: np.ndarray | None = None
) -> torch.Tensor:
    """``(queries, images)`` Slow scores of captions ``queries`` (all when None) against every image
    of ``visual`` (a split's images as the model reads them): the gallery's visual tokens once,
    then every pair."""
    queries = np.arange(len(tokens)) if queries is None else np.asarray(queries)
    gallery = visual_tokens(model, visual, device)
    everyone = torch.arange(len(visual)).expand(len(queries), len(visual))
    return pair_scores(model, gallery, tokens[torch.as_tensor(queries)], everyone)
