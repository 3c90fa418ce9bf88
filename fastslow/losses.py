"""Every loss of the study, in one place."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def symmetric_info_nce(logits: torch.Tensor) -> torch.Tensor:
    """CLIP's contrastive loss for a ``(texts, images)`` logit matrix whose diagonal holds the pairs."""
    targets = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
