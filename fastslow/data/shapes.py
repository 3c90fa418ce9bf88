"""``shapes``: the embedded default dataset, procedurally generated scenes of two coloured shapes.

Built so the papers' claims can show on a laptop:

* attribute binding and spatial relations: every scene has two objects that differ in shape and
  colour and stand in a clear relation (left of / right of / above / below), so "a red circle left
  of a blue square" and "a blue circle left of a red square" are different scenes with the same
  bag of words;
* small objects (about 4-5 px radius at 64 px) that vanish in a coarse feature map;
* hard near-duplicates ("twins"): pairs of images at indices (2k, 2k+1) that are the same scene with
  the colours swapped (``attribute_swap``) or the positions swapped (``relation_flip``). Caption j
  of a twin uses the same template choices as caption j of its partner, so the two captions have
  the same multiset of words; only word order (binding) tells them apart.

Everything is deterministic from ``seed``, and each split has its own generator derived from
(seed, split name), so the test split does not change when ``n_train`` does.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass

import numpy as np

from fastslow.data.types import SPLITS, CaptionedImages

log = logging.getLogger(__name__)

SHAPE_NAMES = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "white": (235, 235, 235),
}
COLOUR_NAMES = tuple(COLOURS)
SIZE_NAMES = ("small", "big")
# Object radius (half its extent) as a fraction of the image size: ~4-5 px and ~10-13 px at 64 px.
RADIUS_RANGE = {"small": (0.065, 0.08), "big": (0.16, 0.2)}
# Each relation as seen from the subject, with the phrasings a caption may use for it.
RELATION_PHRASES = {
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}

# {s}: the subject's noun phrase, {o}: the other object's, {r}: the relation phrase.
FULL_TEMPLATES = (
    "a {s} {r} a {o}",
    "the {s} is {r} the {o}",
    "{s} {r} {o}",
    "there is a {s} {r} a {o}",
    "a {s} {r} a {o} on a dark background",
)
PARTIAL_ONE_OBJECT_TEMPLATES = (
    "a {s}",
    "there is a {s} in the picture",
    "a picture with a {s}",
)
# Partial captions that name both objects (no relation): the only partial kind a colour-swapped
# twin can share word for word with its partner.
PARTIAL_TWO_OBJECT_TEMPLATES = (
    "a {s} and a {o}",
    "two shapes a {s} and a {o}",
    "a {s} and a {o} on a dark background",
)
PARTIAL_TEMPLATES = PARTIAL_ONE_OBJECT_TEMPLATES + PARTIAL_TWO_OBJECT_TEMPLATES
PARTIAL_PROBABILITY = 0.2
SIZE_WORD_PROBABILITY = 0.4

_RENDER_CHUNK = 256  # images per vectorised rendering step: keeps the float canvas at ~12 MB at 64 px
NOISE_AMPLITUDE = 8.0  # background noise, uniform in +-8 grey levels


@dataclass
class _Scenes:
    """Per-image scene parameters; axis 1 of each array is the object (0 or 1)."""

    shape: np.ndarray  # (N, 2) index into SHAPE_NAMES
    colour: np.ndarray  # (N, 2) index into COLOUR_NAMES
    rgb: np.ndarray  # (N, 2, 3) the jittered colour actually drawn
    big: np.ndarray  # (N, 2) bool
    radius: np.ndarray  # (N, 2) pixels
    centre: np.ndarray  # (N, 2, 2) (x, y) pixels, y down
    axis: np.ndarray  # (N,) 0: the objects are side by side, 1: one above the other
    background: np.ndarray  # (N, 3) background RGB level

    def relation(self, image: int, subject: int) -> str:
        """Where object ``subject`` is relative to the other object of the same image."""
        other = 1 - subject
        if self.axis[image] == 0:
            return "left" if self.centre[image, subject, 0] < self.centre[image, other, 0] else "right"
        return "above" if self.centre[image, subject, 1] < self.centre[image, other, 1] else "below"


@dataclass
class _CaptionChoices:
    """The random choices behind each caption, (N, C) arrays; a twin copies its partner's."""

    partial: np.ndarray  # bool
    template: np.ndarray  # index into FULL_TEMPLATES or PARTIAL_TEMPLATES
    subject: np.ndarray  # which object the caption starts with
    phrase: np.ndarray  # which phrasing of the relation
    with_size: np.ndarray  # bool: say "small"/"big"


def split_generator(seed: int, split: str) -> np.random.Generator:
    """The generator of one split, derived from (seed, split name) so splits are independent."""
    return np.random.default_rng([seed, zlib.crc32(split.encode())])


def check_generator_arguments(
    split_sizes: tuple[int, int, int], image_size: int, captions_per_item: int, twin_fraction: float, captions_argument: str
) -> dict[str, int]:
    """Validate the arguments every generated dataset shares; returns ``{split: size}``."""
    sizes = dict(zip(SPLITS, split_sizes))
    if any(n < 0 for n in sizes.values()):
        raise ValueError(f"n_train, n_val and n_test must be >= 0, got {sizes}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 (two big objects side by side), got {image_size}")
    if captions_per_item < 1:
        raise ValueError(f"{captions_argument} must be >= 1, got {captions_per_item}")
    if not 0.0 <= twin_fraction <= 1.0:
        raise ValueError(f"twin_fraction must lie in [0, 1], got {twin_fraction}")
    return sizes


def make_shapes(
    n_train: int,
    n_val: int,
    n_test: int,
    image_size: int = 64,
    captions_per_image: int = 5,
    twin_fraction: float = 0.5,
    seed: int = 0,
) -> dict[str, CaptionedImages]:
    """The three splits of ``shapes``: ``{"train", "val", "test"}`` -> :class:`CaptionedImages`.

    ``twin_fraction`` of each split's images come in near-duplicate pairs at indices (2k, 2k+1).
    """
    sizes = check_generator_arguments(
        (n_train, n_val, n_test), image_size, captions_per_image, twin_fraction, "captions_per_image"
    )
    return {
        split: _make_split(
            split, n, image_size, captions_per_image, twin_fraction, split_generator(seed, split)
        )
        for split, n in sizes.items()
    }


def _make_split(
    split: str,
    n_images: int,
    image_size: int,
    captions_per_image: int,
    twin_fraction: float,
    rng: np.random.Generator,
) -> CaptionedImages:
    scenes = _sample_scenes(n_images, image_size, rng)
    choices = _sample_caption_choices(n_images, captions_per_image, rng)
    twin, twin_kind = _pair_twins(n_images, twin_fraction, rng)
    _make_twins(scenes, choices, twin, twin_kind)
    images = _render(scenes, image_size, rng)
    captions, caption_kind = _write_captions(scenes, choices)
    log.debug("shapes %s: %d images, %d twins", split, n_images, int((twin >= 0).sum()))
    return CaptionedImages(
        dataset="shapes",
        split=split,
        images=images,
        captions=captions,
        caption_image=np.repeat(np.arange(n_images, dtype=np.int64), captions_per_image),
        image_ids=[f"shapes-{split}-{i:06d}" for i in range(n_images)],
        twin=twin,
        twin_kind=twin_kind,
        caption_kind=caption_kind,
        skipped=[],
    )


def _two_distinct(n_images: int, n_choices: int, rng: np.random.Generator) -> np.ndarray:
    """(N, 2) pairs of different indices in [0, n_choices), uniformly over ordered pairs."""
    first = rng.integers(n_choices, size=n_images)
    second = (first + rng.integers(1, n_choices, size=n_images)) % n_choices
    return np.stack([first, second], axis=1)


def _sample_scenes(n_images: int, image_size: int, rng: np.random.Generator) -> _Scenes:
    shape = _two_distinct(n_images, len(SHAPE_NAMES), rng)
    colour = _two_distinct(n_images, len(COLOUR_NAMES), rng)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    rgb = np.clip(palette[colour] + rng.uniform(-15, 15, size=(n_images, 2, 3)), 0, 255)
    big = rng.random((n_images, 2)) < 0.5
    small_lo, small_hi = RADIUS_RANGE["small"]
    big_lo, big_hi = RADIUS_RANGE["big"]
    radius = image_size * np.where(
        big, rng.uniform(big_lo, big_hi, (n_images, 2)), rng.uniform(small_lo, small_hi, (n_images, 2))
    )

    # Both centres keep a margin of the larger radius, so a relation flip (swapping the centres)
    # still fits; the objects' separation along the relation's axis exceeds the sum of radii.
    margin = radius.max(axis=1) + 1.0
    low, high = margin, image_size - 1.0 - margin
    min_separation = radius.sum(axis=1) + 0.04 * image_size
    lower = low + rng.random(n_images) * np.maximum(high - low - min_separation, 0.0)
    slack = np.maximum(high - lower - min_separation, 0.0)
    upper = lower + min_separation + rng.random(n_images) * slack
    mirror = rng.random(n_images) < 0.5  # so the pair is not biased towards the low side
    lower, upper = (
        np.where(mirror, image_size - 1.0 - upper, lower),
        np.where(mirror, image_size - 1.0 - lower, upper),
    )
    object0_lower = (rng.random(n_images) < 0.5)[:, None]
    along = np.where(object0_lower, np.stack([lower, upper], axis=1), np.stack([upper, lower], axis=1))
    # Across the axis the objects are offset by at most a quarter of their separation, so the
    # relation stays unambiguous.
    middle = rng.uniform(low, high)
    offset = rng.uniform(-0.25, 0.25, n_images) * (upper - lower)
    across = np.stack([middle - offset / 2, middle + offset / 2], axis=1)
    across = np.clip(across, low[:, None], high[:, None])
    axis = rng.integers(2, size=n_images)
    horizontal = (axis == 0)[:, None]
    centre = np.stack([np.where(horizontal, along, across), np.where(horizontal, across, along)], axis=2)

    background = rng.uniform(12, 40, (n_images, 1)) + rng.uniform(-4, 4, (n_images, 3))
    return _Scenes(shape, colour, rgb, big, radius, centre, axis, background)


def _sample_caption_choices(
    n_images: int,
    captions_per_image: int,
    rng: np.random.Generator,
    n_full_templates: int = len(FULL_TEMPLATES),
    n_partial_templates: int = len(PARTIAL_TEMPLATES),
    n_phrases: int = 2,
) -> _CaptionChoices:
    """The template counts are parameters so ``shapes-video`` draws its captions the same way."""
    size = (n_images, captions_per_image)
    partial = rng.random(size) < PARTIAL_PROBABILITY
    partial_template = rng.integers(n_partial_templates, size=size)
    template = np.where(partial, partial_template, rng.integers(n_full_templates, size=size))
    return _CaptionChoices(
        partial=partial,
        template=template,
        subject=rng.integers(2, size=size),
        phrase=rng.integers(n_phrases, size=size),
        with_size=rng.random(size) < SIZE_WORD_PROBABILITY,
    )


def _pair_twins(
    n_images: int,
    twin_fraction: float,
    rng: np.random.Generator,
    twin_kinds: tuple[str, str] = ("attribute_swap", "relation_flip"),
) -> tuple[np.ndarray, list[str]]:
    """Pick which slots (2k, 2k+1) hold a twin pair, and the kind of each pair (either of
    ``twin_kinds``, equally likely)."""
    n_slots = n_images // 2
    n_pairs = min(n_slots, int(round(twin_fraction * n_images / 2)))
    slots = np.sort(rng.choice(n_slots, size=n_pairs, replace=False))
    kinds = np.where(rng.random(n_pairs) < 0.5, *twin_kinds)
    twin = np.full(n_images, -1, dtype=np.int64)
    twin_kind = [""] * n_images
    for slot, kind in zip(slots, kinds):
        first, second = 2 * slot, 2 * slot + 1
        twin[first], twin[second] = second, first
        twin_kind[first] = twin_kind[second] = str(kind)
    return twin, twin_kind


def _make_twins(
    scenes: _Scenes, choices: _CaptionChoices, twin: np.ndarray, twin_kind: list[str]
) -> None:
    """Overwrite each pair's second image with its partner's scene, colours or positions swapped,
    and give it the partner's caption choices."""
    second = np.flatnonzero((twin >= 0) & (np.arange(len(twin)) % 2 == 1))
    first = second - 1
    for field in ("shape", "colour", "rgb", "big", "radius", "centre", "axis", "background"):
        getattr(scenes, field)[second] = getattr(scenes, field)[first]
    for field in ("partial", "template", "subject", "phrase", "with_size"):
        getattr(choices, field)[second] = getattr(choices, field)[first]

    colour_swapped = second[[twin_kind[i] == "attribute_swap" for i in second]]
    scenes.colour[colour_swapped] = scenes.colour[colour_swapped][:, ::-1]
    scenes.rgb[colour_swapped] = scenes.rgb[colour_swapped][:, ::-1]
    # A one-object partial caption ("a red circle") cannot name the same words in a colour-swapped
    # twin, so both images of such a pair use only two-object partial templates.
    n_one_object = len(PARTIAL_ONE_OBJECT_TEMPLATES)
    for image in (colour_swapped, colour_swapped - 1):
        template = choices.template[image]
        one_object = choices.partial[image] & (template < n_one_object)
        two_object = n_one_object + template % len(PARTIAL_TWO_OBJECT_TEMPLATES)
        choices.template[image] = np.where(one_object, two_object, template)

    flipped = second[[twin_kind[i] == "relation_flip" for i in second]]
    scenes.centre[flipped] = scenes.centre[flipped][:, ::-1]
    # "X left of Y" becomes "Y left of X": same relation phrase, the other object as subject.
    subject = choices.subject[flipped]
    choices.subject[flipped] = np.where(choices.partial[flipped], subject, 1 - subject)


def _signed_distance(shape: int, dx: np.ndarray, dy: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Approximate signed distance (pixels, negative inside) to a shape of half-extent ``radius``."""
    if SHAPE_NAMES[shape] == "circle":
        return np.sqrt(dx * dx + dy * dy) - radius
    if SHAPE_NAMES[shape] == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.88 * radius
    if SHAPE_NAMES[shape] == "diamond":
        return (np.abs(dx) + np.abs(dy) - radius) / np.sqrt(2.0)
    # Triangle pointing up: apex at -radius, base at +0.75 radius, base half-width radius.
    height = 1.75 * radius
    side = (np.abs(dx) * height - radius * (dy + radius)) / np.sqrt(height * height + radius * radius)
    return np.maximum(dy - 0.75 * radius, side)


def _render(scenes: _Scenes, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Dark noisy background, then each object composited with an anti-aliased edge.

    Objects are drawn in a square patch around their centre rather than over the whole image,
    which keeps 10,000 images at 64 px to a couple of seconds on one core."""
    n_images = len(scenes.shape)
    images = np.empty((n_images, image_size, image_size, 3), dtype=np.uint8)
    patch_size = min(image_size, int(np.ceil(2 * (RADIUS_RANGE["big"][1] * image_size + 1))) + 3)
    offsets = np.arange(patch_size)
    for start in range(0, n_images, _RENDER_CHUNK):
        chunk = slice(start, min(start + _RENDER_CHUNK, n_images))
        n_chunk = chunk.stop - chunk.start
        # In-place arithmetic on one array: the canvas is the cost that grows with image size.
        canvas = rng.random((n_chunk, image_size, image_size, 3), dtype=np.float32)
        canvas *= 2 * NOISE_AMPLITUDE
        canvas += (scenes.background[chunk] - NOISE_AMPLITUDE).astype(np.float32)[:, None, None, :]
        for obj in (0, 1):
            centre = scenes.centre[chunk, obj]
            corner = np.floor(centre).astype(np.int64) - patch_size // 2
            corner = np.clip(corner, 0, image_size - patch_size)
            columns = corner[:, 0, None] + offsets  # (n_chunk, patch_size)
            rows = corner[:, 1, None] + offsets
            where = (np.arange(n_chunk)[:, None, None], rows[:, :, None], columns[:, None, :])
            patch = canvas[where]  # (n_chunk, patch_size, patch_size, 3)
            dx = (columns - centre[:, 0, None]).astype(np.float32)[:, None, :]
            dy = (rows - centre[:, 1, None]).astype(np.float32)[:, :, None]
            radius = scenes.radius[chunk, obj, None, None].astype(np.float32)
            shapes = scenes.shape[chunk, obj]
            for shape in np.unique(shapes):
                members = np.flatnonzero(shapes == shape)
                distance = _signed_distance(int(shape), dx[members], dy[members], radius[members])
                alpha = np.clip(0.5 - distance, 0.0, 1.0)[..., None]
                colour = scenes.rgb[chunk][members, obj, None, None, :].astype(np.float32)
                patch[members] = patch[members] * (1.0 - alpha) + colour * alpha
            canvas[where] = patch
        np.clip(np.rint(canvas, out=canvas), 0, 255, out=canvas)
        np.copyto(images[chunk], canvas, casting="unsafe")
    return images


def _noun_phrase(scenes: _Scenes, image: int, obj: int, with_size: bool) -> str:
    words = [COLOUR_NAMES[scenes.colour[image, obj]], SHAPE_NAMES[scenes.shape[image, obj]]]
    if with_size:
        words.insert(0, SIZE_NAMES[int(scenes.big[image, obj])])
    return " ".join(words)


def _write_captions(scenes: _Scenes, choices: _CaptionChoices) -> tuple[list[str], list[str]]:
    captions, caption_kind = [], []
    n_images, captions_per_image = choices.partial.shape
    for image in range(n_images):
        for j in range(captions_per_image):
            subject = int(choices.subject[image, j])
            with_size = bool(choices.with_size[image, j])
            words = {
                "s": _noun_phrase(scenes, image, subject, with_size),
                "o": _noun_phrase(scenes, image, 1 - subject, with_size),
            }
            if choices.partial[image, j]:
                template = PARTIAL_TEMPLATES[choices.template[image, j]]
                caption_kind.append("partial")
            else:
                template = FULL_TEMPLATES[choices.template[image, j]]
                words["r"] = RELATION_PHRASES[scenes.relation(image, subject)][choices.phrase[image, j]]
                caption_kind.append("full")
            captions.append(template.format(**words))
    return captions, caption_kind


def vocabulary() -> list[str]:
    """Every word a ``shapes`` caption can use, sorted."""
    phrases = (
        FULL_TEMPLATES
        + PARTIAL_TEMPLATES
        + tuple(p for variants in RELATION_PHRASES.values() for p in variants)
    )
    return words_of(phrases)


def words_of(templates: tuple[str, ...]) -> list[str]:
    """The sorted words of caption templates and the object names they are filled with (colours,
    shapes, sizes), without the ``{placeholders}`` and punctuation."""
    phrases = templates + SHAPE_NAMES + COLOUR_NAMES + SIZE_NAMES
    words = {word for phrase in phrases for word in phrase.replace(",", " ").split() if not word.startswith("{")}
    return sorted(words)
