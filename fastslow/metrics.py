"""Retrieval metrics under the standard image-caption protocol.

Scores are a ``(num_captions, num_images)`` matrix, higher is better. Text-to-image: every caption
is a query and the rank of its own image counts. Image-to-text: every image is a query and the best
rank among its own captions counts. Ranks are 1-based; ties are broken pessimistically (an equal
score ranks above), so a constant scorer cannot look good, and the rule needs no order of the
gallery: the same scores give the same ranks on every machine.
"""

from __future__ import annotations

import numpy as np
import torch

RECALL_KS = (1, 5, 10)


def _as_numpy(scores) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        return scores.detach().float().cpu().numpy()
    return np.asarray(scores, dtype=np.float32)


def text_to_image_ranks(scores, caption_image: np.ndarray) -> np.ndarray:
    """Rank of each caption's own image among all images (1 = first)."""
    scores = _as_numpy(scores)
    own = scores[np.arange(len(scores)), caption_image]
    return (scores >= own[:, None]).sum(axis=1)


def image_to_text_ranks(scores, caption_image: np.ndarray) -> np.ndarray:
    """Best rank among each image's own captions, for images that have a caption among the rows."""
    scores = _as_numpy(scores)
    images = np.unique(caption_image)
    by_image = scores[:, images].T  # (images, captions)
    ranks = np.empty(len(images), dtype=np.int64)
    for row, image in enumerate(images):
        column = by_image[row]
        own = column[caption_image == image]
        ranks[row] = (column[None, :] >= own[:, None]).sum(axis=1).min()
    return ranks


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Percentage of queries whose target is within the first ``k``."""
    return 100.0 * float(np.mean(np.asarray(ranks) <= k))


def rank_summary(ranks: np.ndarray) -> dict[str, float]:
    ranks = np.asarray(ranks)
    summary = {f"R@{k}": recall_at_k(ranks, k) for k in RECALL_KS}
    summary["MdR"] = float(np.median(ranks))
    summary["MnR"] = float(np.mean(ranks))
    return summary


def retrieval_metrics(scores, caption_image: np.ndarray) -> dict[str, dict]:
    """R@1/5/10, median and mean rank in both directions, RSUM (sum of the six recalls), and the
    per-query ranks behind them (``result["ranks"]["t2i"]``: one per caption row; ``["i2t"]``: one
    per image that has a caption among the rows), from which intervals are bootstrapped."""
    caption_image = np.asarray(caption_image)
    ranks = {"t2i": text_to_image_ranks(scores, caption_image), "i2t": image_to_text_ranks(scores, caption_image)}
    result: dict[str, dict] = {direction: rank_summary(r) for direction, r in ranks.items()}
    result["RSUM"] = {"RSUM": rsum(result)}
    result["ranks"] = ranks
    result["gallery"] = int(np.shape(scores)[1])  # the images (clips) every caption was ranked against
    return result


def rsum(metrics: dict[str, dict[str, float]]) -> float:
    return sum(metrics[d][f"R@{k}"] for d in ("t2i", "i2t") for k in RECALL_KS)


def evaluate(scores, split, queries: np.ndarray | None = None) -> dict[str, dict]:
    """:func:`retrieval_metrics` of a split; row r of ``scores`` is caption ``queries[r]`` (all
    captions in order when ``queries`` is None)."""
    caption_image = split.caption_image if queries is None else split.caption_image[np.asarray(queries)]
    return retrieval_metrics(scores, caption_image)
