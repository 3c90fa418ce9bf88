"""The one container every dataset split comes in: images, a flat caption list, and near-duplicates.

Captions are a flat list with ``caption_image`` pointing at their image (rather than a list of lists)
because retrieval evaluation treats every caption as a query and needs its image index as an array.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SPLITS = ("train", "val", "test")
TWIN_KINDS = ("", "attribute_swap", "relation_flip", "order_swap", "direction_flip")
CAPTION_KINDS = ("full", "partial", "")


@dataclass
class CaptionedImages:
    """One split of a captioned-image dataset, or of a captioned-clip dataset: ``images`` is
    ``(N, H, W, 3)``, or ``(N, T, H, W, 3)`` for clips of ``T`` frames (see :attr:`frames`).

    ``twin[i]`` is the index of image ``i``'s hard near-duplicate in the same split (``-1`` if none),
    with ``twin_kind[i]`` saying how the two differ. ``caption_kind`` is ``"full"`` for a caption
    naming both objects and their relation, ``"partial"`` otherwise, ``""`` when unknown (real data).
    ``meta`` says where a split came from when that is not obvious (e.g. Flickr8k's ``test`` being
    its dev list), so results can state it. ``centres``: for generated clips, each object's
    ``(x, y)`` centre in pixels in each frame, ``(N, T, objects, 2)`` (what the clip strips draw
    the motion from); None for everything else.
    """

    dataset: str
    split: str
    images: np.ndarray
    captions: list[str]
    caption_image: np.ndarray
    image_ids: list[str]
    twin: np.ndarray
    twin_kind: list[str]
    caption_kind: list[str]
    skipped: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    centres: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.caption_image = np.asarray(self.caption_image, dtype=np.int64)
        self.twin = np.asarray(self.twin, dtype=np.int64)
        self._validate()

    def _validate(self) -> None:
        where = f"split {self.split!r} of dataset {self.dataset!r}"
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.images.ndim not in (4, 5) or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images of {where} must be a (N, H, W, 3) or, for clips, (N, T, H, W, 3) uint8 array, "
                f"got shape {self.images.shape} dtype {self.images.dtype}"
            )
        n_images, n_captions = len(self.images), len(self.captions)
        per_image = {
            "image_ids": len(self.image_ids),
            "twin": len(self.twin),
            "twin_kind": len(self.twin_kind),
        }
        per_caption = {"caption_image": len(self.caption_image), "caption_kind": len(self.caption_kind)}
        for name, length in per_image.items():
            if length != n_images:
                raise ValueError(f"{name} of {where} has {length} entries for {n_images} images")
        for name, length in per_caption.items():
            if length != n_captions:
                raise ValueError(f"{name} of {where} has {length} entries for {n_captions} captions")
        if self.centres is not None and self.centres.shape[:2] != self.images.shape[:2]:
            raise ValueError(f"centres of {where} must be (N, T, objects, 2) for its {self.images.shape[:2]} clips")
        if self.caption_image.ndim != 1 or self.twin.ndim != 1:
            raise ValueError(f"caption_image and twin of {where} must be 1-D arrays")
        bad_kinds = set(self.twin_kind) - set(TWIN_KINDS)
        bad_kinds |= set(self.caption_kind) - set(CAPTION_KINDS)
        if bad_kinds:
            raise ValueError(f"unknown twin or caption kinds in {where}: {sorted(bad_kinds)}")
        if n_captions and (self.caption_image.min() < 0 or self.caption_image.max() >= n_images):
            raise ValueError(f"caption_image of {where} points outside the {n_images} images")
        captions_per_image = np.bincount(self.caption_image, minlength=n_images)
        if n_images and captions_per_image.min() == 0:
            orphan = self.image_ids[int(np.argmin(captions_per_image))]
            raise ValueError(f"image {orphan!r} in split {self.split!r} has no captions")
        self._validate_twins(where)

    def _validate_twins(self, where: str) -> None:
        n_images = len(self.images)
        has_twin = self.twin >= 0
        if np.any(self.twin >= n_images) or np.any(self.twin < -1):
            raise ValueError(f"twin of {where} points outside the {n_images} images")
        if np.any(self.twin[has_twin] == np.flatnonzero(has_twin)):
            raise ValueError(f"an image of {where} is its own twin")
        if np.any(self.twin[self.twin[has_twin]] != np.flatnonzero(has_twin)):
            raise ValueError(f"twin of {where} is not symmetric: twin[twin[i]] != i")
        kind_given = np.array([kind != "" for kind in self.twin_kind], dtype=bool)
        if np.any(kind_given != has_twin):
            raise ValueError(f"twin_kind of {where} must be non-empty exactly for images with a twin")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def frames(self) -> int:
        """Frames per item: 1 for images, ``T`` for clips stored as ``(N, T, H, W, 3)``."""
        return 1 if self.images.ndim == 4 else self.images.shape[1]

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def captions_by_image(self) -> list[np.ndarray]:
        """For each image, the indices of its captions in ``captions`` (in order)."""
        order = np.argsort(self.caption_image, kind="stable")
        bounds = np.cumsum(np.bincount(self.caption_image, minlength=len(self)))[:-1]
        return np.split(order, bounds)

    def captions_of(self, image_index: int) -> list[str]:
        """The captions of one image, in their order in ``captions``."""
        return [self.captions[j] for j in np.flatnonzero(self.caption_image == image_index)]

    def subset(self, image_indices: Sequence[int] | np.ndarray) -> CaptionedImages:
        """The images at ``image_indices`` (in that order) with their captions; captions keep their
        relative order, and a twin left outside the subset becomes ``-1``."""
        chosen = np.asarray(image_indices, dtype=np.int64).reshape(-1)
        if len(np.unique(chosen)) != len(chosen):
            raise ValueError("subset image_indices must not repeat an image")
        if len(chosen) and (chosen.min() < 0 or chosen.max() >= len(self)):
            raise ValueError(f"subset image_indices must lie in [0, {len(self)})")
        new_index = np.full(len(self), -1, dtype=np.int64)
        new_index[chosen] = np.arange(len(chosen))
        kept_captions = np.flatnonzero(new_index[self.caption_image] >= 0)
        old_twin = self.twin[chosen]
        new_twin = np.where(old_twin >= 0, new_index[np.maximum(old_twin, 0)], -1)
        return CaptionedImages(
            dataset=self.dataset,
            split=self.split,
            images=self.images[chosen],
            captions=[self.captions[j] for j in kept_captions],
            caption_image=new_index[self.caption_image[kept_captions]],
            image_ids=[self.image_ids[i] for i in chosen],
            twin=new_twin,
            twin_kind=[self.twin_kind[i] if t >= 0 else "" for i, t in zip(chosen, new_twin)],
            caption_kind=[self.caption_kind[j] for j in kept_captions],
            skipped=list(self.skipped),
            meta=dict(self.meta),
            centres=None if self.centres is None else self.centres[chosen],
        )


# Clips are the same container with a time axis (``images`` of shape (N, T, H, W, 3)): one class, so
# subsetting, validation and evaluation are the same code for images and videos.
CaptionedVideos = CaptionedImages
