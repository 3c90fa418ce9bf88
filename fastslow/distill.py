"""Slow -> Fast distillation: the TFS way (Miech et al. 2021) and the DCD way (Rao et al. 2022).

Both fine-tune the trained dual encoder (the student) on the same fixed batches for the same
number of epochs; a control run does the same with no teacher, so a difference is the teacher's.
The losses are :func:`fastslow.losses.distillation_loss`.

Candidates are **in-batch**: each caption's candidates are the batch's images (and each image's
the batch's captions). Batches are fixed once and made hard: each groups an image with its nearest
neighbours under the student's own embedding, so the in-batch negatives are near-duplicates. Fixed
batches let the teacher's ``B x B`` scores be computed once and cached: epochs after the first
cost no teacher time.

Losses, with ``S`` the student's scaled similarities and ``T`` the teacher's scores / ``tau_t``:

- TFS: ``L = alpha * InfoNCE(S) + (1 - alpha) * (KL_rows(T || S) + KL_cols(T || S)) / 2``, with
  ``KL_rows(T || S) = mean_i KL(softmax(T_i) || softmax(S_i))`` over the whole batch.
- DCD: the teacher keeps, for each query, the positive and its ``k`` highest-scored negatives
  (DCD's official code keeps 7 of 63 drawn at random; we keep ``k`` of ``B - 1`` in-batch ones).
  The KL is taken over those ``k + 1`` candidates only, each row weighted by
  :func:`fastslow.losses.dynamic_sample_weights` (teacher entropy, shifting with training progress):
  ``L = alpha * InfoNCE(S) + (1 - alpha) * (wKL_rows + wKL_cols) / 2`` with alpha = 0.2, which puts
  0.8 on the teacher's term: DCD's official code puts 0.2 there instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fastslow.cache import load_or_build
from fastslow.config import StudyConfig
from fastslow.data.types import CaptionedImages
from fastslow.inputs import model_input, text_input
from fastslow.models.cross_attention import pair_scores, visual_tokens
from fastslow.models.dual_encoder import DualEncoder, embed_images

log = logging.getLogger(__name__)

# "control": the same fine-tuning with no teacher, so a difference is the teacher's.
METHODS = ("control", "tfs", "dcd")
# The method words of summary.csv.
METHOD_NAMES = {"control": "control", "tfs": "distilled_tfs", "dcd": "distilled_dcd"}


def hard_batches(embeddings: torch.Tensor, batch_size: int, seed: int) -> np.ndarray:
    """Group images into fixed batches of near neighbours: ``(batches, batch_size)`` indices.

    Greedy: take a random unassigned image and its ``batch_size - 1`` most similar unassigned
    images. Images left over (fewer than a batch) are dropped for the run.
    """
    rng = np.random.default_rng(seed)
    similarity = (embeddings @ embeddings.T).numpy()
    unassigned = np.ones(len(embeddings), dtype=bool)
    batches = []
    for anchor in rng.permutation(len(embeddings)):
        if unassigned.sum() < batch_size:
            break
        if not unassigned[anchor]:
            continue
        candidates = np.where(unassigned, similarity[anchor], -np.inf)
        members = np.argpartition(-candidates, batch_size - 1)[:batch_size]
        unassigned[members] = False
        batches.append(members)
    return np.stack(batches)


def fixed_captions(split: CaptionedImages, seed: int) -> np.ndarray:
    """One caption per image, drawn once, so the teacher's cached scores stay valid every epoch."""
    rng = np.random.default_rng(seed)
    return np.array([rng.choice(captions) for captions in split.captions_by_image()])


def teacher_batch_scores(teacher, visual, tokens: torch.Tensor, batches: np.ndarray, captions: np.ndarray, device: str) -> torch.Tensor:
    """The teacher's ``(batches, B, B)`` scores: caption of image ``b[i]`` against image ``b[j]``."""
    size = batches.shape[1]
    everyone = torch.arange(size).expand(size, size)
    scores = []
    for batch in tqdm(batches, desc="teacher scores", leave=False):
        gallery = visual_tokens(teacher, visual[batch], device)
        scores.append(pair_scores(teacher, gallery, tokens[captions[batch]], everyone).float().cpu())
    return torch.stack(scores)


class DistillBatches:
    """One epoch over the fixed batches, in an order drawn from ``(seed, epoch)``."""

    def __init__(self, visual, texts, batches, captions, teacher_scores, seed: int, epoch: int):
        """``visual``: the training images as the student reads them (pixels or frozen features);
        ``texts``: its text inputs per caption (token ids or frozen sentence features)."""
        self.visual, self.texts, self.batches, self.captions = visual, texts, batches, captions
        self.teacher_scores = teacher_scores
        self.order = np.random.default_rng([seed, epoch]).permutation(len(batches))

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for b in self.order:
            members = self.batches[b]
            yield {
                "images": model_input(self.visual[members]),
                "texts": text_input(self.texts[self.captions[members]]),
                "teacher": self.teacher_scores[b],
            }


def distillation_key(cfg: StudyConfig, student_key: Any, teacher_key: Any, method: str, seed: int) -> dict[str, Any]:
    return {"student": student_key, "teacher": teacher_key, "distill": cfg.distill, "method": method, "seed": seed}


def prepare(cfg: StudyConfig, data, student: DualEncoder, teacher, student_key: Any, teacher_key: Any, seed: int) -> dict[str, Any]:
    """Fixed batches, fixed captions and the teacher's cached scores on them, drawn from ``seed``:
    seeds of a multi-seed comparison differ in their batches and captions as well as in their order."""
    train = data.splits["train"]
    batch_size = min(cfg.distill.train.batch_size, len(train))
    key = {"student": student_key, "teacher": teacher_key, "batch_size": batch_size, "seed": seed}

    def build() -> dict[str, Any]:
        batches = hard_batches(embed_images(student, data.visual["train"], cfg.device), batch_size, seed=seed)
        captions = fixed_captions(train, seed=seed)
        texts = data.slow_texts("train", teacher.reads)
        scores = teacher_batch_scores(teacher, data.visual["train"], texts, batches, captions, cfg.device)
        return {"batches": batches, "captions": captions, "teacher_scores": scores}

    # The cache stores tensors (it loads with weights_only=True, which refuses numpy arrays).
    return load_or_build(
        "teacher_scores", key, build,
        to_stored=lambda prepared: {**prepared, "batches": torch.from_numpy(prepared["batches"]),
                                    "captions": torch.from_numpy(prepared["captions"])},
        from_stored=lambda stored: {**stored, "batches": stored["batches"].numpy(),
                                    "captions": stored["captions"].numpy()},
    )
