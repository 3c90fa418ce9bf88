"""Tests of fastslow.data: the shapes generator, the container, the tokenizer, the folder loader."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from fastslow.data.folder import load_image_folder
from fastslow.data.shapes import COLOURS, make_shapes, vocabulary
from fastslow.data.text import WordTokenizer, split_words
from fastslow.data.types import CaptionedImages

# Relation words in captions -> the relation they state.
RELATION_WORDS = {
    "left": "left",
    "right": "right",
    "above": "above",
    "over": "above",
    "below": "below",
    "under": "below",
}


@pytest.fixture(scope="module")
def shapes() -> dict[str, CaptionedImages]:
    return make_shapes(n_train=40, n_val=10, n_test=200, seed=3)


def colour_mask(image: np.ndarray, colour: str) -> np.ndarray:
    """Pixels within the colour jitter (+-15) of a palette colour, plus a little anti-aliasing slack."""
    distance = np.abs(image.astype(np.int64) - np.array(COLOURS[colour])).max(axis=-1)
    return distance <= 25


# --- shapes -------------------------------------------------------------------------------------


def test_shapes_arrays_have_the_declared_shapes_and_dtypes(shapes):
    test = shapes["test"]
    assert set(shapes) == {"train", "val", "test"}
    assert [len(shapes[s]) for s in ("train", "val", "test")] == [40, 10, 200]
    assert test.images.shape == (200, 64, 64, 3) and test.images.dtype == np.uint8
    assert test.num_captions == 1000 and test.caption_image.dtype == np.int64
    assert np.array_equal(np.bincount(test.caption_image), np.full(200, 5))
    assert test.image_ids[123] == "shapes-test-000123"
    assert test.dataset == "shapes" and test.split == "test" and test.skipped == []
    assert make_shapes(2, 0, 0, image_size=32)["train"].images.shape == (2, 32, 32, 3)


def test_shapes_is_deterministic_from_the_seed():
    first, again, other = (make_shapes(6, 4, 8, seed=seed) for seed in (7, 7, 8))
    for split in ("train", "val", "test"):
        assert np.array_equal(first[split].images, again[split].images)
        assert first[split].captions == again[split].captions
        assert np.array_equal(first[split].twin, again[split].twin)
        assert not np.array_equal(first[split].images, other[split].images)
    assert not np.array_equal(first["train"].images[:4], first["val"].images), "splits must differ"


def test_test_split_does_not_depend_on_the_other_split_sizes():
    small, large = make_shapes(5, 3, 12, seed=1), make_shapes(50, 7, 12, seed=1)
    assert np.array_equal(small["test"].images, large["test"].images)
    assert small["test"].captions == large["test"].captions


def test_captions_use_a_small_vocabulary_and_about_one_in_five_are_partial(shapes):
    test = shapes["test"]
    assert len(vocabulary()) <= 60
    assert {word for caption in test.captions for word in split_words(caption)} <= set(vocabulary())
    kinds = Counter(test.caption_kind)
    assert set(kinds) == {"full", "partial"}
    assert 0.1 < kinds["partial"] / test.num_captions < 0.3
    assert len({caption.split()[0] for caption in test.captions}) >= 5, "phrasing varies"


def test_full_captions_match_the_pixels_colours_relation_and_size(shapes):
    """Parse each full caption (subject colour, relation, object colour) and check the image."""
    test = shapes["test"]
    checked = 0
    for j in np.flatnonzero(np.array(test.caption_kind) == "full")[:300]:
        image = test.images[test.caption_image[j]]
        words = split_words(test.captions[j])
        named = [w for w in words if w in COLOURS]
        relation = next(RELATION_WORDS[w] for w in words if w in RELATION_WORDS)
        assert len(named) == 2, test.captions[j]
        masks = [colour_mask(image, colour) for colour in named]
        assert all(mask.sum() >= 8 for mask in masks), f"{test.captions[j]!r}: colour not in the image"
        for colour in set(COLOURS) - set(named):
            assert colour_mask(image, colour).sum() == 0, f"{test.captions[j]!r}: {colour} in the image"
        (subject_y, subject_x), (object_y, object_x) = (np.argwhere(mask).mean(axis=0) for mask in masks)
        expected = {
            "left": subject_x < object_x,
            "right": subject_x > object_x,
            "above": subject_y < object_y,
            "below": subject_y > object_y,
        }[relation]
        assert expected, f"relation of {test.captions[j]!r} does not hold in the image"
        for size_word, mask in zip([w for w in words if w in ("small", "big")], masks):
            # small objects: radius <= 5.1 px (area < 90 px); big: radius >= 10.2 px (area > 180 px).
            assert (mask.sum() < 130) == (size_word == "small"), test.captions[j]
        checked += 1
    assert checked > 200


def test_twins_are_adjacent_pairs_with_the_same_words_and_different_images(shapes):
    test = shapes["test"]
    paired = np.flatnonzero(test.twin >= 0)
    assert len(paired) == 100, "twin_fraction=0.5 of 200 images"
    assert np.array_equal(test.twin[paired], paired ^ 1), "twins sit at (2k, 2k+1)"
    assert {test.twin_kind[i] for i in paired} == {"attribute_swap", "relation_flip"}
    assert all(test.twin_kind[i] == "" for i in np.flatnonzero(test.twin < 0))
    for first in paired[paired % 2 == 0]:
        second = first + 1
        assert test.twin_kind[first] == test.twin_kind[second]
        assert not np.array_equal(test.images[first], test.images[second])
        captions_a, captions_b = test.captions_of(first), test.captions_of(second)
        kinds = [test.caption_kind[j] for j in np.flatnonzero(test.caption_image == first)]
        for caption_a, caption_b, kind in zip(captions_a, captions_b, kinds):
            assert sorted(split_words(caption_a)) == sorted(split_words(caption_b))
            if kind == "full":
                assert caption_a != caption_b, "a full caption must tell the twins apart"


def test_twin_fraction_sets_how_many_images_have_a_twin():
    assert np.all(make_shapes(0, 0, 20, twin_fraction=0.0)["test"].twin == -1)
    assert np.all(make_shapes(0, 0, 20, twin_fraction=1.0)["test"].twin >= 0)


@pytest.mark.parametrize("kwargs", [{"twin_fraction": 1.5}, {"captions_per_image": 0}, {"n_train": -1}])
def test_make_shapes_rejects_bad_arguments(kwargs):
    arguments = {"n_train": 2, "n_val": 2, "n_test": 2} | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        make_shapes(**arguments)


# --- the container ------------------------------------------------------------------------------


def test_subset_reindexes_captions_and_drops_twins_left_outside(shapes):
    test = shapes["test"]
    pair = int(np.flatnonzero(test.twin >= 0)[0])
    lone = int(np.flatnonzero(test.twin < 0)[0])
    chosen = [pair + 1, lone, pair]  # keeps the pair (in reverse order)
    sub = test.subset(chosen)
    assert len(sub) == 3 and sub.num_captions == 15
    assert sub.twin.tolist() == [2, -1, 0]
    assert sub.captions_of(0) == test.captions_of(pair + 1)
    assert sub.image_ids == [test.image_ids[i] for i in chosen]
    assert np.array_equal(sub.images[1], test.images[lone])
    alone = test.subset([pair])
    assert alone.twin.tolist() == [-1] and alone.twin_kind == [""]
    with pytest.raises(ValueError, match="repeat"):
        test.subset([0, 0])


def test_container_rejects_an_image_without_captions(shapes):
    train = shapes["train"].subset([0, 1, 2])
    keep = train.caption_image != 1
    with pytest.raises(ValueError, match="image 'shapes-train-000001' in split 'train' has no captions"):
        CaptionedImages(
            dataset="shapes",
            split="train",
            images=train.images,
            captions=[c for c, k in zip(train.captions, keep) if k],
            caption_image=train.caption_image[keep],
            image_ids=train.image_ids,
            twin=np.full(3, -1),
            twin_kind=[""] * 3,
            caption_kind=[k for k, kept in zip(train.caption_kind, keep) if kept],
            skipped=[],
        )


def test_container_rejects_mismatched_lengths_and_one_sided_twins(shapes):
    train = shapes["train"].subset([0, 1])
    fields = dict(vars(train))
    with pytest.raises(ValueError, match="image_ids .* 1 entries for 2 images"):
        CaptionedImages(**fields | {"image_ids": ["only-one"]})
    with pytest.raises(ValueError, match="not symmetric"):
        CaptionedImages(**fields | {"twin": np.array([1, -1]), "twin_kind": ["relation_flip", ""]})
    with pytest.raises(ValueError, match="uint8"):
        CaptionedImages(**fields | {"images": train.images.astype(np.float32)})


# --- tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_pads_marks_and_round_trips():
    tokenizer = WordTokenizer.fit(["A red circle.", "the blue square, left of a red circle"])
    assert tokenizer.vocab_size == 4 + 8
    ids = tokenizer.encode(["a red circle", "the blue square left of a red circle"])
    assert ids.dtype == torch.long and ids.shape == (2, 10)
    assert ids[:, 0].tolist() == [WordTokenizer.bos_id] * 2
    assert ids[0, 4].item() == WordTokenizer.eos_id and ids[1, 9].item() == WordTokenizer.eos_id
    assert ids[0, 5:].tolist() == [WordTokenizer.pad_id] * 5
    assert tokenizer.decode(ids[1]) == "the blue square left of a red circle"
    assert tokenizer.decode(ids[0].tolist()) == "a red circle"


def test_tokenizer_truncates_keeping_eos_and_maps_unknown_words_to_unk():
    tokenizer = WordTokenizer.fit(["a red circle left of a blue square"])
    ids = tokenizer.encode(["a red circle left of a blue square", "a green circle"], max_len=5)
    assert ids.shape == (2, 5)
    assert ids[0].tolist()[-1] == WordTokenizer.eos_id
    assert tokenizer.decode(ids[0]) == "a red circle"
    assert ids[1, 2].item() == WordTokenizer.unk_id
    assert tokenizer.decode(ids[1]) == "a <unk> circle"
    with pytest.raises(ValueError, match="max_len"):
        tokenizer.encode(["a"], max_len=1)


def test_tokenizer_state_survives_json_and_rejects_empty_input():
    tokenizer = WordTokenizer.fit(["b b a", "c"])
    restored = WordTokenizer.from_state_dict(json.loads(json.dumps(tokenizer.state_dict())))
    captions = ["a b c", "c a"]
    assert torch.equal(restored.encode(captions), tokenizer.encode(captions))
    assert tokenizer.words[0] == "b", "most frequent word first"
    with pytest.raises(ValueError, match="empty"):
        WordTokenizer.fit([])
    with pytest.raises(ValueError, match="empty"):
        tokenizer.encode([])


# --- folder loader ------------------------------------------------------------------------------


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def image_folder(tmp_path):
    """train/ with a red RGB png, a greyscale png, a corrupt png and a row naming a missing file."""
    train = tmp_path / "flowers" / "train"
    train.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(train / "red.png")
    Image.new("L", (20, 20), 128).save(train / "grey.png")
    (train / "broken.png").write_bytes(b"not a png at all")
    rows = [
        {"file_name": "red.png", "text": "a red picture"},
        {"file_name": "grey.png", "text": ["a grey square", "grey everywhere"]},
        {"file_name": "broken.png", "text": "never loads"},
        {"file_name": "red.png", "text": "all red"},
        {"file_name": "missing.png", "text": "not there"},
    ]
    write_jsonl(train / "metadata.jsonl", rows)
    return tmp_path / "flowers"


def test_folder_loads_groups_captions_and_counts_skipped_files(image_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="fastslow.data.folder"):
        data = load_image_folder(image_folder, "train", image_size=16)
    assert data.dataset == "flowers" and data.split == "train"
    assert data.image_ids == ["red.png", "grey.png"]
    assert data.images.shape == (2, 16, 16, 3) and data.images.dtype == np.uint8
    assert np.abs(data.images[0].astype(int) - (200, 10, 10)).max() <= 2
    assert np.all(data.images[1] == 128), "greyscale is converted to RGB"
    assert data.captions_of(0) == ["a red picture", "all red"]
    assert data.captions_of(1) == ["a grey square", "grey everywhere"]
    assert data.caption_kind == [""] * 4 and np.all(data.twin == -1)
    assert sorted(p.split("/")[-1] for p in data.skipped) == ["broken.png", "missing.png"]
    assert "skipped 2 of 4 images" in caplog.text


def test_folder_accepts_validation_folder_and_csv_with_caption_column(tmp_path):
    split = tmp_path / "data" / "validation"
    split.mkdir(parents=True)
    Image.new("RGB", (8, 8), (0, 0, 255)).save(split / "blue.jpg")
    csv_text = 'file_name,caption\nblue.jpg,a blue square\nblue.jpg,"blue, all blue"\n'
    (split / "metadata.csv").write_text(csv_text)
    data = load_image_folder(tmp_path / "data", "val", image_size=8, dataset="mine")
    assert data.dataset == "mine" and data.split == "val"
    assert data.captions == ["a blue square", "blue, all blue"]


def test_folder_errors_name_the_missing_path(tmp_path, image_folder):
    missing_root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing_root))):
        load_image_folder(missing_root, "train", 16)
    with pytest.raises(FileNotFoundError, match=re.escape(str(image_folder / "test"))):
        load_image_folder(image_folder, "test", 16)
    (image_folder / "train" / "metadata.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="metadata.jsonl or metadata.csv"):
        load_image_folder(image_folder, "train", 16)


def test_folder_errors_on_bad_metadata_name_the_file_or_columns(image_folder):
    metadata = image_folder / "train" / "metadata.jsonl"
    write_jsonl(metadata, [{"file_name": "red.png", "label": 3}])
    with pytest.raises(ValueError, match=re.escape("columns found: ['file_name', 'label']")):
        load_image_folder(image_folder, "train", 16)
    write_jsonl(metadata, [{"file_name": "red.png", "text": "ok"}, {"file_name": "grey.png", "text": []}])
    with pytest.raises(ValueError, match="'grey.png' has an empty caption"):
        load_image_folder(image_folder, "train", 16)
    write_jsonl(metadata, [{"file_name": "grey.png", "text": ["fine", "  "]}])
    with pytest.raises(ValueError, match="'grey.png' has an empty caption"):
        load_image_folder(image_folder, "train", 16)
    metadata.write_text("")
    with pytest.raises(ValueError, match="no captions at all"):
        load_image_folder(image_folder, "train", 16)
