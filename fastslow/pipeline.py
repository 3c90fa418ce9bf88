"""One function per stage of the study, each a single line in a notebook.

Each stage loads the cached artifact for its exact config or trains and saves it
(:func:`fastslow.cache.load_or_build`): a notebook run on its own trains what it needs, and one run
after its predecessors reuses their artifacts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fastslow import metrics
from fastslow.cache import artifact_path, config_hash, load_or_build
from fastslow.config import StudyConfig
from fastslow.data import CaptionedImages, WordTokenizer, load_dataset
from fastslow.data.batches import PairBatches, headline_queries
from fastslow.losses import symmetric_info_nce
from fastslow.models.dual_encoder import DualEncoder, embed_images, embed_texts
from fastslow.train import fit

log = logging.getLogger(__name__)


@dataclass
class Study:
    """The data a stage works on: splits, the tokenizer fitted on the training captions, and the
    tokenised captions of each split."""

    config: StudyConfig
    splits: dict[str, CaptionedImages]
    tokenizer: WordTokenizer
    tokens: dict[str, torch.Tensor]

    @property
    def test(self) -> CaptionedImages:
        return self.splits["test"]

    def headline_queries(self) -> np.ndarray:
        """The test captions every method's ``headline`` row is scored on."""
        return headline_queries(self.test, self.config.headline_captions_per_image)


def study(cfg: StudyConfig) -> Study:
    splits = load_dataset(cfg.data)
    tokenizer = WordTokenizer.fit(splits["train"].captions)
    max_tokens = cfg.dual.encoder.max_caption_tokens
    tokens = {name: tokenizer.encode(split.captions, max_len=max_tokens) for name, split in splits.items()}
    return Study(cfg, splits, tokenizer, tokens)


@dataclass
class Trained:
    """A trained model with what produced it."""

    model: nn.Module
    history: dict[str, list[dict[str, float]]]
    config_hash: str
    train_seconds: float


def train_or_load(
    stage: str,
    key: Any,
    make_model,
    loss_fn,
    epoch_batches,
    validate,
    cfg: StudyConfig,
    train_config,
) -> Trained:
    """Load ``stage``'s cached weights for ``key``, or train them with :func:`fastslow.train.fit`."""

    def build() -> dict[str, Any]:
        model = make_model()
        started = time.perf_counter()
        history = fit(
            model,
            loss_fn,
            epoch_batches,
            validate,
            train_config,
            seed=cfg.seed,
            device=cfg.device,
            checkpoint=artifact_path(stage, key, ".ckpt"),
            desc=stage,
        )
        seconds = time.perf_counter() - started
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        return {"state": state, "history": history, "train_seconds": seconds}

    artifact = load_or_build(stage, key, build)
    artifact_path(stage, key, ".ckpt").unlink(missing_ok=True)
    model = make_model()
    model.load_state_dict(artifact["state"])
    model.to(cfg.device).eval()
    return Trained(model, artifact["history"], config_hash(key), artifact["train_seconds"])


def dual_encoder_scores(model: DualEncoder, split: CaptionedImages, tokens: torch.Tensor, device: str) -> torch.Tensor:
    """``(captions, images)`` cosine similarities of the Fast model over a whole split."""
    return embed_texts(model, tokens, device) @ embed_images(model, split.images, device).T


def dual_encoder_key(cfg: StudyConfig) -> dict[str, Any]:
    return {"data": cfg.data, "model": cfg.dual, "train": cfg.train_dual, "seed": cfg.seed}


def dual_encoder(cfg: StudyConfig, data: Study | None = None) -> Trained:
    """The Fast model trained with symmetric InfoNCE, early-stopped on validation RSUM."""
    data = data or study(cfg)
    train, val = data.splits["train"], data.splits["val"]

    def contrastive(model: DualEncoder, batch: dict[str, torch.Tensor], progress: float) -> torch.Tensor:
        return symmetric_info_nce(model(batch["images"], batch["tokens"]))

    def validation_rsum(model: DualEncoder) -> float:
        scores = dual_encoder_scores(model, val, data.tokens["val"], cfg.device)
        return metrics.rsum(metrics.retrieval_metrics(scores, val.caption_image))

    return train_or_load(
        "dual_encoder",
        dual_encoder_key(cfg),
        lambda: DualEncoder(data.tokenizer.vocab_size, cfg.dual, cfg.data.image_size),
        contrastive,
        lambda epoch: PairBatches(train, data.tokens["train"], cfg.train_dual.batch_size, cfg.seed, epoch),
        validation_rsum,
        cfg,
        cfg.train_dual,
    )
