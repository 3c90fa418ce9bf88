"""``shapes-video``: short clips of two coloured shapes that move, captioned by motion, direction and order.

The temporal counterpart of :mod:`fastslow.data.shapes`, with the same objects, renderer, colours,
sizes and noun phrases. Built so what the video claims need can show:

* motion and direction: each object moves left, right, up or down (a fixed distance along a
  straight line) or stays still;
* temporal order: in about half the clips the objects move one after the other (the first during
  the first half of the clip, the second during the second half), captioned in order ("the red
  circle moves right, then the blue square falls"); in the others they move at the same time, or
  one stays still;
* hard near-duplicates ("twins") at indices (2k, 2k+1): ``order_swap`` (the same two motions from
  the same start, the other object first) and ``direction_flip`` (one object travels the same path
  the other way). Caption j of a twin uses the same template choices as caption j of its partner,
  so an order swap has the same bag of words and a direction flip differs in one direction word.
  A single frame, or an average over frames, cannot tell the twins apart as well as the sequence.

The two objects never overlap in any frame (each is inside its own bounding box plus a pixel's
gap) and never leave the image. Everything is deterministic from ``seed``, each split with its
own generator (:func:`fastslow.data.shapes.split_generator`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from fastslow.data.shapes import (
    RADIUS_RANGE,
    _CaptionChoices,
    _noun_phrase,
    _pair_twins,
    _render,
    _sample_caption_choices,
    _sample_scenes,
    _Scenes,
    check_generator_arguments,
    split_generator,
    words_of,
)
from fastslow.data.types import SPLITS, CaptionedVideos

log = logging.getLogger(__name__)

DIRECTIONS = ("left", "right", "up", "down", "still")
STILL = DIRECTIONS.index("still")
# One step along each direction in image coordinates (x to the right, y down).
DIRECTION_STEPS = np.array([[-1, 0], [1, 0], [0, -1], [0, 1], [0, 0]], dtype=np.float64)
OPPOSITE = np.array([DIRECTIONS.index(d) for d in ("right", "left", "down", "up", "still")])
# Variant k of a direction and of its opposite differ in exactly one word, so a direction-flipped
# twin's caption differs from its partner's in the direction word only.
MOTION_PHRASES = {
    "left": ("moves left", "goes left", "slides to the left"),
    "right": ("moves right", "goes right", "slides to the right"),
    "up": ("moves up", "goes up", "rises"),
    "down": ("moves down", "goes down", "falls"),
    "still": ("stays still", "does not move", "stays where it is"),
}
DIRECTION_WORDS = ("left", "right", "up", "down", "rises", "falls")

# {a}/{b}: noun phrases, {ma}/{mb}: their motion phrases. In ORDERED_TEMPLATES {a} moves first.
ORDERED_TEMPLATES = (
    "the {a} {ma}, then the {b} {mb}",
    "first the {a} {ma} and then the {b} {mb}",
    "the {a} {ma} before the {b} {mb}",
    "the {b} {mb} after the {a} {ma}",
    "a {a} {ma} and then a {b} {mb}",
)
SIMULTANEOUS_TEMPLATES = (
    "the {a} {ma} while the {b} {mb}",
    "the {a} {ma} as the {b} {mb}",
    "at the same time the {a} {ma} and the {b} {mb}",
    "a {a} {ma} while a {b} {mb}",
    "the {a} {ma} and meanwhile the {b} {mb}",
)
# Partial captions leave out the order, or one object, or the motion.
PARTIAL_TEMPLATES = (
    "the {a} {ma}",
    "a {a} that {ma}",
    "the {a} {ma} and the {b} {mb}",
    "a {a} and a {b}",
)

ONE_AFTER_THE_OTHER_PROBABILITY = 0.5
# Among clips whose objects move at the same time, the share where one of them stays still.
ONE_STILL_PROBABILITY = 0.3
# How far a moving object travels, as a fraction of the image size (~11-15 px at 48 px).
TRAVEL_RANGE = (0.22, 0.32)
GAP = 1.0  # pixels between the two objects' bounding boxes, in every frame
# A clip whose paths leave no room to pass (rare with at most one big object): every _SHRINK_EVERY
# rounds without a placement, its travel shrinks by _TRAVEL_SHRINK.
_SHRINK_EVERY = 25
_TRAVEL_SHRINK = 0.8
_MAX_PLACEMENT_ROUNDS = 400


@dataclass
class _Motions:
    """Per-clip motion; axis 1 of the (N, 2) arrays is the object (0 or 1)."""

    direction: np.ndarray  # (N, 2) index into DIRECTIONS
    one_after_the_other: np.ndarray  # (N,) bool: sequential (else simultaneous)
    first: np.ndarray  # (N,) the object that moves first (sequential clips)
    travel: np.ndarray  # (N, 2) pixels
    start: np.ndarray  # (N, 2, 2) (x, y) pixels in the first frame


def make_shapes_video(
    n_train: int,
    n_val: int,
    n_test: int,
    frames: int = 8,
    image_size: int = 48,
    captions_per_clip: int = 5,
    twin_fraction: float = 0.5,
    seed: int = 0,
) -> dict[str, CaptionedVideos]:
    """The three splits of ``shapes-video``: ``{"train", "val", "test"}`` -> clips ``(N, T, H, W, 3)``.

    ``twin_fraction`` of each split's clips come in near-duplicate pairs at indices (2k, 2k+1).
    """
    sizes = check_generator_arguments(
        (n_train, n_val, n_test), image_size, captions_per_clip, twin_fraction, "captions_per_clip"
    )
    if frames < 3:
        raise ValueError(f"frames must be >= 3 (one object moves, then the other), got {frames}")
    # "video-" keeps these generators apart from the still ``shapes`` splits of the same seed.
    generators = {split: split_generator(seed, f"video-{split}") for split in SPLITS}
    return {
        split: _make_split(split, n, frames, image_size, captions_per_clip, twin_fraction, generators[split])
        for split, n in sizes.items()
    }


def _make_split(
    split: str,
    n_clips: int,
    frames: int,
    image_size: int,
    captions_per_clip: int,
    twin_fraction: float,
    rng: np.random.Generator,
) -> CaptionedVideos:
    # The objects (shape, colour, size, background) are drawn as for still images; their
    # positions come from the motions instead.
    scenes = _sample_scenes(n_clips, image_size, rng)
    _at_most_one_big(scenes, image_size, rng)
    choices = _sample_caption_choices(
        n_clips,
        captions_per_clip,
        rng,
        n_full_templates=len(ORDERED_TEMPLATES),
        n_partial_templates=len(PARTIAL_TEMPLATES),
        n_phrases=len(MOTION_PHRASES["still"]),
    )
    twin, twin_kind = _pair_twins(n_clips, twin_fraction, rng, twin_kinds=("order_swap", "direction_flip"))
    second = np.flatnonzero((twin >= 0) & (np.arange(n_clips) % 2 == 1))
    for part in (scenes, choices):
        for field in dataclasses.fields(part):
            getattr(part, field.name)[second] = getattr(part, field.name)[second - 1]
    motions = _sample_motions(scenes, second, [twin_kind[i] for i in second], frames, image_size, rng)
    centres = _centres(motions, frames)
    clips = _render(_frame_scenes(scenes, centres), image_size, rng)
    captions, caption_kind = _write_captions(scenes, motions, choices)
    log.debug("shapes-video %s: %d clips, %d twins", split, n_clips, int((twin >= 0).sum()))
    return CaptionedVideos(
        dataset="shapes-video",
        split=split,
        images=clips.reshape(n_clips, frames, image_size, image_size, 3),
        captions=captions,
        caption_image=np.repeat(np.arange(n_clips, dtype=np.int64), captions_per_clip),
        image_ids=[f"shapes-video-{split}-{i:06d}" for i in range(n_clips)],
        twin=twin,
        twin_kind=twin_kind,
        caption_kind=caption_kind,
        skipped=[],
        centres=centres.astype(np.float32),
    )


def _at_most_one_big(scenes: _Scenes, image_size: int, rng: np.random.Generator) -> None:
    """Make one object of each clip with two big ones small: at 48 px two big objects on crossing
    paths have no room to pass each other."""
    both = np.flatnonzero(scenes.big.all(axis=1))
    shrunk = rng.integers(2, size=len(both))
    scenes.big[both, shrunk] = False
    scenes.radius[both, shrunk] = image_size * rng.uniform(*RADIUS_RANGE["small"], size=len(both))


def _sample_motions(
    scenes: _Scenes,
    second: np.ndarray,
    second_kind: list[str],
    frames: int,
    image_size: int,
    rng: np.random.Generator,
) -> _Motions:
    """Directions and timing, then start positions by rejection: a clip is redrawn (with its twin)
    until, in every frame of both, the objects stay inside the image and apart."""
    n_clips = len(scenes.shape)
    first_of_pair = second - 1
    order_swapped = second[np.array(second_kind, dtype=str) == "order_swap"]
    flipped = second[np.array(second_kind, dtype=str) == "direction_flip"]

    direction = rng.integers(STILL, size=(n_clips, 2))
    one_after_the_other = rng.random(n_clips) < ONE_AFTER_THE_OTHER_PROBABILITY
    one_after_the_other[order_swapped - 1] = True  # an order swap needs an order
    first = rng.integers(2, size=n_clips)
    # Only simultaneous clips may have a still object (in a sequential one both move).
    one_still = ~one_after_the_other & (rng.random(n_clips) < ONE_STILL_PROBABILITY)
    still_object = rng.integers(2, size=n_clips)
    direction[one_still, still_object[one_still]] = STILL
    # A direction flip reverses a moving object: the moving one, or either when both move.
    flipped_object = np.where(one_still, 1 - still_object, rng.integers(2, size=n_clips))[flipped - 1]
    travel, start = np.zeros((n_clips, 2)), np.zeros((n_clips, 2, 2))  # placed below
    motions = _Motions(direction, one_after_the_other, first, travel, start)
    for field in ("direction", "one_after_the_other", "first"):
        getattr(motions, field)[second] = getattr(motions, field)[first_of_pair]
    motions.first[order_swapped] = 1 - motions.first[order_swapped]
    motions.direction[flipped, flipped_object] = OPPOSITE[motions.direction[flipped, flipped_object]]

    low = scenes.radius + 1.0  # (N, 2) the lowest centre coordinate that keeps an object inside
    high = image_size - 2.0 - scenes.radius
    drawn = np.setdiff1d(np.arange(n_clips), second)  # a twin's path follows its partner's
    pending = drawn
    for placement_round in range(_MAX_PLACEMENT_ROUNDS):
        if len(pending) == 0:
            break
        shrink = _TRAVEL_SHRINK ** (placement_round // _SHRINK_EVERY)
        motions.travel[pending] = shrink * image_size * rng.uniform(*TRAVEL_RANGE, size=(len(pending), 2))
        path = _paths(motions)[pending]  # (n, 2, 2): each object's whole displacement
        lowest = low[pending][..., None] - np.minimum(path, 0)
        highest = high[pending][..., None] - np.maximum(path, 0)
        motions.start[pending] = lowest + rng.random(lowest.shape) * (highest - lowest)
        motions.travel[second], motions.start[second] = motions.travel[first_of_pair], motions.start[first_of_pair]
        # A flipped twin's object starts where its partner's ends, and travels back.
        partner_end = motions.start[flipped - 1, flipped_object] + _paths(motions)[flipped - 1, flipped_object]
        motions.start[flipped, flipped_object] = partner_end
        valid = _valid(_centres(motions, frames), scenes.radius, low, high)
        valid[first_of_pair] &= valid[second]
        pending = drawn[~valid[drawn]]
    if len(pending):
        raise RuntimeError(f"could not place {len(pending)} clips in {_MAX_PLACEMENT_ROUNDS} rounds")
    return motions


def _progress(motions: _Motions, frames: int) -> np.ndarray:
    """(N, T, 2) how far along its path each object is in each frame, from 0 to 1.

    Simultaneous: both move from the first frame to the last. One after the other: the first
    moves over frames [0, T//2], the second over [T//2, T-1], so no frame step moves both."""
    t = np.arange(frames, dtype=np.float64)
    half = frames // 2
    together = t / (frames - 1)
    early, late = np.minimum(t / half, 1.0), np.clip((t - half) / (frames - 1 - half), 0.0, 1.0)
    sequential = np.where(
        (motions.first == 0)[:, None, None], np.stack([early, late], -1), np.stack([late, early], -1)
    )
    return np.where(motions.one_after_the_other[:, None, None], sequential, together[None, :, None])


def _paths(motions: _Motions) -> np.ndarray:
    """(N, 2, 2): each object's (x, y) displacement from its first frame to its last."""
    return DIRECTION_STEPS[motions.direction] * motions.travel[..., None]


def _centres(motions: _Motions, frames: int) -> np.ndarray:
    """(N, T, 2, 2): each object's (x, y) centre in each frame."""
    return motions.start[:, None] + _progress(motions, frames)[..., None] * _paths(motions)[:, None]


def _valid(centres: np.ndarray, radius: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """(N,) True where in every frame both objects are inside and their bounding boxes apart."""
    inside = (centres >= low[:, None, :, None] - 1e-6) & (centres <= high[:, None, :, None] + 1e-6)
    apart = np.abs(centres[:, :, 0] - centres[:, :, 1]) >= (radius.sum(axis=1) + GAP)[:, None, None]
    return inside.all(axis=(1, 2, 3)) & apart.any(axis=2).all(axis=1)


def _frame_scenes(scenes: _Scenes, centres: np.ndarray) -> _Scenes:
    """One still scene per frame (clip-major), for the image renderer."""
    frames = centres.shape[1]
    repeated = {f.name: np.repeat(getattr(scenes, f.name), frames, axis=0) for f in dataclasses.fields(scenes)}
    return _Scenes(**repeated | {"centre": centres.reshape(-1, 2, 2)})


def _write_captions(scenes: _Scenes, motions: _Motions, choices: _CaptionChoices) -> tuple[list[str], list[str]]:
    captions, caption_kind = [], []
    n_clips, captions_per_clip = choices.partial.shape
    for clip in range(n_clips):
        directions = [DIRECTIONS[d] for d in motions.direction[clip]]
        for j in range(captions_per_clip):
            with_size = bool(choices.with_size[clip, j])
            nouns = [_noun_phrase(scenes, clip, obj, with_size) for obj in (0, 1)]
            moves = [MOTION_PHRASES[direction][choices.phrase[clip, j]] for direction in directions]
            subject = int(choices.subject[clip, j])
            if choices.partial[clip, j]:
                template = PARTIAL_TEMPLATES[choices.template[clip, j]]
                caption_kind.append("partial")
            elif motions.one_after_the_other[clip]:
                template = ORDERED_TEMPLATES[choices.template[clip, j]]
                subject = int(motions.first[clip])  # ordered templates name the first mover as {a}
                caption_kind.append("full")
            else:
                template = SIMULTANEOUS_TEMPLATES[choices.template[clip, j]]
                caption_kind.append("full")
            other = 1 - subject
            captions.append(template.format(a=nouns[subject], ma=moves[subject], b=nouns[other], mb=moves[other]))
    return captions, caption_kind


def vocabulary() -> list[str]:
    """Every word a ``shapes-video`` caption can use, sorted."""
    motion = tuple(phrase for variants in MOTION_PHRASES.values() for phrase in variants)
    return words_of(ORDERED_TEMPLATES + SIMULTANEOUS_TEMPLATES + PARTIAL_TEMPLATES + motion)
