"""Tests of the real-data foundation: the loaders, the offline pretrained backbones, the feature cache.

Every loader runs on a tiny dataset written under ``tmp_path``; the shared Flickr8k sample is used
only when ``<repo>/../shared/data/flickr8k`` exists.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastslow import features
from fastslow.config import DataConfig
from fastslow.data import load_dataset
from fastslow.data.real import (
    CARVED_VALIDATION_IMAGES,
    carve_validation,
    carved_validation_size,
    choose_images,
    flickr8k_split_names,
    load_flickr8k,
    load_hf_dataset,
    load_karpathy_json,
    load_real_dataset,
)
from fastslow.data.types import SPLITS
from fastslow.features import FeatureParams, extract_features
from fastslow.models.pretrained import image_backbone, text_backbone

SHARED_FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"
COLOURS = {
    "red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "grey": (128, 128, 128),
    "yellow": (220, 200, 20),
}


def save_image(path: Path, colour: str, size: tuple[int, int] = (20, 14)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLOURS[colour]).save(path, format="PNG")


# --- Flickr8k release layout ----------------------------------------------------------------------


@pytest.fixture
def flickr8k(tmp_path) -> Path:
    """Six images (one corrupt), two captions each: four train, two dev, no test list.

    Without a test list one train image is carved out as validation: seed 0 carves y.jpg.
    """
    root = tmp_path / "flickr8k"
    colours = {"r.jpg": "red", "g.jpg": "green", "y.jpg": "yellow", "b.jpg": "blue", "k.jpg": "grey"}
    for name, colour in colours.items():
        save_image(root / "images" / name, colour)
    (root / "images" / "bad.jpg").write_bytes(b"not an image")
    names = ["r.jpg", "g.jpg", "bad.jpg", "y.jpg", "b.jpg", "k.jpg"]
    lines = [f"{name}#{k}\t{name[0]} caption {k} ." for name in names for k in range(2)]
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_text("r.jpg\ng.jpg\nbad.jpg\ny.jpg\n")
    (root / "Flickr_8k.devImages.txt").write_text("b.jpg\nk.jpg\n")
    return root


def test_flickr8k_loads_splits_counts_skipped_and_tests_on_dev(flickr8k, caplog):
    with caplog.at_level(logging.WARNING):
        splits = load_flickr8k(flickr8k, image_size=8)
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert train.image_ids == ["r.jpg", "g.jpg"] and val.image_ids == ["y.jpg"] and test.image_ids == ["b.jpg", "k.jpg"]
    assert train.images.shape == (2, 8, 8, 3) and train.images.dtype == np.uint8
    assert np.abs(train.images[1].astype(int) - COLOURS["green"]).max() <= 2
    assert np.abs(val.images[0].astype(int) - COLOURS["yellow"]).max() <= 2
    assert train.captions_of(0) == ["r caption 0 .", "r caption 1 ."]
    assert train.caption_kind == [""] * 4 and np.all(train.twin == -1) and train.twin_kind == ["", ""]
    assert [Path(p).name for p in train.skipped] == ["bad.jpg"] and val.skipped == []
    assert "skipped 1 of 3 images" in caplog.text
    warnings = [r.getMessage() for r in caplog.records if "no Flickr_8k.testImages.txt" in r.getMessage()]
    assert len(warnings) == 1, "the split rule is logged once per load"
    assert "test is the dev split" in warnings[0] and "1 images carved out of Flickr_8k.trainImages.txt" in warnings[0]


# A Flickr8k layout with enough train images that carving validation out of them means something.
MANY_TRAIN, MANY_DEV = [f"t{i:02d}.png" for i in range(20)], [f"d{i}.png" for i in range(4)]


@pytest.fixture
def flickr8k_many(tmp_path) -> Path:
    """20 train and 4 dev images of 8 x 8 pixels, one caption each, no test list."""
    root = tmp_path / "flickr8k_many"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in MANY_TRAIN + MANY_DEV:
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "images" / name)
    (root / "Flickr8k.token.txt").write_text("".join(f"{n}#0\tphoto {n} .\n" for n in MANY_TRAIN + MANY_DEV))
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(MANY_TRAIN) + "\n")
    (root / "Flickr_8k.devImages.txt").write_text("\n".join(MANY_DEV) + "\n")
    return root


def test_without_a_test_list_validation_is_carved_from_train_and_dev_is_test(flickr8k_many):
    splits = load_flickr8k(flickr8k_many, image_size=8, seed=0)
    train, val, test = (splits[s].image_ids for s in ("train", "val", "test"))
    assert test == MANY_DEV, "the dev list is the test split, whole"
    assert len(val) == carved_validation_size(20) == 4 and set(val) <= set(MANY_TRAIN)
    assert not set(val) & set(MANY_DEV), "nothing is chosen on the images numbers are reported on"
    assert not set(val) & set(train) and sorted(train + val) == MANY_TRAIN, "carved images leave train"
    assert train == [n for n in MANY_TRAIN if n in train] and val == [n for n in MANY_TRAIN if n in val], "listed order"


def test_with_a_test_list_validation_is_dev_and_test_is_test(flickr8k_many):
    (flickr8k_many / "Flickr_8k.devImages.txt").write_text("\n".join(MANY_DEV[:2]))
    (flickr8k_many / "Flickr_8k.testImages.txt").write_text("\n".join(MANY_DEV[2:]))
    splits = load_flickr8k(flickr8k_many, image_size=8)
    assert splits["train"].image_ids == MANY_TRAIN, "nothing is carved when the release has a test list"
    assert splits["val"].image_ids == MANY_DEV[:2] and splits["test"].image_ids == MANY_DEV[2:]
    assert {s: splits[s].meta["source_split"] for s in SPLITS} == {"train": "train", "val": "dev", "test": "test"}
    assert splits["test"].meta["source"].endswith("Flickr_8k.testImages.txt")
    assert all("carved_from" not in splits[s].meta and "note" not in splits[s].meta for s in SPLITS)


def test_carving_is_seeded_and_comes_before_the_caps(flickr8k_many):
    carved = {seed: flickr8k_split_names(flickr8k_many, seed)["val"][0] for seed in (0, 1)}
    assert carved[0] == flickr8k_split_names(flickr8k_many, 0)["val"][0] == carve_validation(MANY_TRAIN, 0)[1]
    assert carved[0] != carved[1], "another seed carves other images"
    assert load_flickr8k(flickr8k_many, 8, seed=1)["val"].image_ids == carved[1]
    capped = load_flickr8k(flickr8k_many, 8, max_images={"train": 5, "val": 2, "test": 3}, seed=0)
    assert [len(capped[s]) for s in SPLITS] == [5, 2, 3]
    assert set(capped["val"].image_ids) <= set(carved[0]), "the caps subsample the carved set, never re-carve"
    assert not set(capped["train"].image_ids) & set(carved[0]) and set(capped["test"].image_ids) <= set(MANY_DEV)
    assert capped["train"].meta["of_images"] == 16 and capped["val"].meta["of_images"] == 4
    sizes = {n: carved_validation_size(n) for n in (2, 9, 10, 2_499, 2_500, 4_000)}
    assert sizes == {2: 1, 9: 1, 10: 2, 2_499: 499, 2_500: CARVED_VALIDATION_IMAGES, 4_000: CARVED_VALIDATION_IMAGES}


def test_each_split_meta_records_where_it_came_from(flickr8k_many):
    splits = load_flickr8k(flickr8k_many, image_size=8, seed=3)
    train, val, test = (splits[s].meta for s in SPLITS)
    assert train["source"].endswith("Flickr_8k.trainImages.txt") and train["source_split"] == "train"
    assert train["carved_images"] == 4 and "carved out as validation" in train["note"]
    assert val["source"] == train["source"] and val["source_split"] == "train" and val["carved_from"] == "train"
    assert val["carved_images"] == 4 and val["carve_seed"] == 3 and "carved out of the train list" in val["note"]
    assert test["source"].endswith("Flickr_8k.devImages.txt") and test["source_split"] == "dev"
    assert "no Flickr_8k.testImages.txt" in test["note"] and "test is the dev split" in test["note"]


def test_flickr8k_reads_a_test_list_and_the_release_image_folder(flickr8k):
    (flickr8k / "images").rename(flickr8k / "Flicker8k_Dataset")
    (flickr8k / "Flickr_8k.testImages.txt").write_text("k.jpg\n")
    (flickr8k / "Flickr_8k.devImages.txt").write_text("b.jpg\n")
    splits = load_flickr8k(flickr8k, image_size=4)
    assert splits["train"].image_ids == ["r.jpg", "g.jpg", "y.jpg"]
    assert splits["val"].image_ids == ["b.jpg"] and splits["test"].image_ids == ["k.jpg"]
    assert splits["val"].meta["source_split"] == "dev" and splits["test"].meta["source_split"] == "test"


def test_flickr8k_errors_name_the_file_or_record(flickr8k):
    (flickr8k / "Flickr_8k.trainImages.txt").write_text("r.jpg\n")
    with pytest.raises(ValueError, match="Flickr_8k.trainImages.txt lists only one image: too few to carve"):
        load_flickr8k(flickr8k, 8)
    (flickr8k / "Flickr_8k.trainImages.txt").write_text("r.jpg\ng.jpg\nnew.jpg\n")
    with pytest.raises(ValueError, match="trainImages.txt: image 'new.jpg' has no captions in .*Flickr8k.token.txt"):
        load_flickr8k(flickr8k, 8)
    (flickr8k / "Flickr_8k.trainImages.txt").write_text("r.jpg\ng.jpg\n")
    (flickr8k / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(FileNotFoundError, match="Flickr_8k.devImages.txt"):
        load_flickr8k(flickr8k, 8)
    (flickr8k / "Flickr_8k.devImages.txt").write_text("b.jpg\nnew.jpg\n")
    with pytest.raises(ValueError, match="devImages.txt: image 'new.jpg' has no captions in .*Flickr8k.token.txt"):
        load_flickr8k(flickr8k, 8)
    (flickr8k / "Flickr8k.token.txt").write_text("r.jpg#0\tfine\nr.jpg a caption without a tab\n")
    with pytest.raises(ValueError, match="Flickr8k.token.txt line 2"):
        load_flickr8k(flickr8k, 8)
    (flickr8k / "Flickr8k.token.txt").unlink()
    with pytest.raises(FileNotFoundError, match="Flickr8k.token.txt"):
        load_flickr8k(flickr8k, 8)


def test_max_images_keeps_a_seeded_nested_subset_in_listed_order(flickr8k):
    small, again, large = choose_images(50, 10, seed=3), choose_images(50, 10, seed=3), choose_images(50, 30, seed=3)
    assert np.array_equal(small, again) and np.all(np.diff(small) > 0)
    assert set(small) <= set(large) and not np.array_equal(small, choose_images(50, 10, seed=4))
    assert np.array_equal(choose_images(5, 9, seed=0), np.arange(5))
    splits = load_flickr8k(flickr8k, 4, max_images={"test": 1}, seed=0)
    assert len(splits["train"]) == 2 and len(splits["val"]) == 1 and len(splits["test"]) == 1
    assert splits["test"].image_ids == load_flickr8k(flickr8k, 4, max_images={"test": 1}, seed=0)["test"].image_ids
    assert splits["test"].meta["max_images"] == 1 and splits["test"].meta["of_images"] == 2
    with pytest.raises(ValueError, match="at least 1"):
        load_flickr8k(flickr8k, 4, max_images=0)


def test_load_dataset_wires_real_names_with_profile_caps(flickr8k, tmp_path):
    config = DataConfig(dataset="flickr8k", data_dir=str(flickr8k), n_train=3, n_val=2, n_test=1, image_size=6)
    splits = load_dataset(config)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [2, 1, 1], (
        "train: 4 listed, 1 carved out as validation, 1 unreadable"
    )
    assert splits["val"].images.shape[1:] == (6, 6, 3)
    with pytest.raises(ValueError, match="needs data_dir"):
        load_real_dataset("flickr30k", None, 8)
    with pytest.raises(FileNotFoundError, match="dataset_flickr30k.json"):
        load_real_dataset("flickr30k", tmp_path, 8)
    with pytest.raises(FileNotFoundError, match="not found: .*nowhere"):
        load_real_dataset("coco", tmp_path / "nowhere", 8)


# --- Karpathy-split JSON --------------------------------------------------------------------------


def karpathy_record(filename: str, split: str, captions: list[str], filepath: str | None = None) -> dict:
    record = {"filename": filename, "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}
    if filepath:
        record["filepath"] = filepath
    return record


@pytest.fixture
def coco(tmp_path) -> Path:
    """COCO-style: images under val2014/ and train2014/, one restval image."""
    root = tmp_path / "coco"
    rows = [("val2014", "v1.jpg", "val", "red"), ("val2014", "v2.jpg", "restval", "green"),
            ("train2014", "t1.jpg", "train", "blue"), ("val2014", "v3.jpg", "test", "grey")]
    for folder, name, _, colour in rows:
        save_image(root / folder / name, colour)
    images = [
        karpathy_record(name, split, [f"{colour} one", f"{colour} two"], folder) for folder, name, split, colour in rows
    ]
    (root / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    return root


def test_karpathy_json_joins_restval_to_train_and_finds_the_image_folder(coco):
    splits = load_real_dataset("coco", coco, image_size=8)
    assert splits["train"].image_ids == ["val2014/v2.jpg", "train2014/t1.jpg"]
    assert splits["val"].image_ids == ["val2014/v1.jpg"] and splits["test"].captions == ["grey one", "grey two"]
    assert splits["train"].dataset == "coco" and splits["val"].meta["source"].endswith("dataset_coco.json")
    flickr = coco.parent / "f30k"
    for name, colour in [("a.jpg", "red"), ("b.jpg", "green"), ("c.jpg", "blue")]:
        save_image(flickr / "flickr30k-images" / name, colour)
    images = [karpathy_record(n, s, ["x"]) for n, s in [("a.jpg", "train"), ("b.jpg", "val"), ("c.jpg", "test")]]
    (flickr / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    splits = load_real_dataset("flickr30k", flickr / "dataset_flickr30k.json", image_size=4, max_images=1)
    assert [splits[s].image_ids for s in ("train", "val", "test")] == [["a.jpg"], ["b.jpg"], ["c.jpg"]]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"split": "train", "sentences": [{"raw": "x"}]}, r"images\[0\] \(None\) has no 'filename'"),
        ({"filename": "v1.jpg", "split": "dev", "sentences": [{"raw": "x"}]}, r"'v1.jpg'\) has split 'dev'"),
        ({"filename": "v1.jpg", "split": "val", "sentences": [{"tokens": ["x"]}]}, "without 'raw' text"),
        ({"filename": "v1.jpg", "split": "val", "sentences": []}, "has no 'sentences'"),
    ],
)
def test_karpathy_json_rejects_bad_records_naming_them(coco, record, message):
    (coco / "dataset_coco.json").write_text(json.dumps({"images": [record]}))
    with pytest.raises(ValueError, match=message):
        load_karpathy_json(coco / "dataset_coco.json", 8, image_dir=coco / "val2014")


def test_karpathy_json_errors_on_bad_files_missing_splits_and_images(coco, tmp_path):
    json_path = coco / "dataset_coco.json"
    content = json.loads(json_path.read_text())
    json_path.write_text(json.dumps({"images": [r for r in content["images"] if r["split"] != "test"]}))
    with pytest.raises(ValueError, match="no images in split 'test'"):
        load_karpathy_json(json_path, 8)
    json_path.write_text("{not json")
    with pytest.raises(ValueError, match="dataset_coco.json is not valid JSON"):
        load_karpathy_json(json_path, 8)
    json_path.write_text(json.dumps(content))
    with pytest.raises(FileNotFoundError, match="image folder not found: .*elsewhere"):
        load_karpathy_json(json_path, 8, image_dir=tmp_path / "elsewhere")
    moved = tmp_path / "json_only"
    moved.mkdir()
    json_path.rename(moved / "dataset_coco.json")
    with pytest.raises(FileNotFoundError, match="no val2014/v1.jpg under"):
        load_karpathy_json(moved / "dataset_coco.json", 8)
    with pytest.raises(FileNotFoundError, match="file not found: .*missing.json"):
        load_karpathy_json(tmp_path / "missing.json", 8)


# --- Hugging Face datasets ------------------------------------------------------------------------


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """Keep the arrow files ``datasets`` writes out of the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return tmp_path / "hf_cache"


def test_hf_saved_dataset_with_a_split_column_groups_and_skips_unreadable(tmp_path, hf_cache, caplog):
    import datasets

    pngs = {}
    for colour in ("red", "green", "blue", "grey"):
        save_image(tmp_path / "src" / f"{colour}.png", colour)
        pngs[colour] = (tmp_path / "src" / f"{colour}.png").read_bytes()
    rows = [  # one row per caption, Karpathy-style split values, one undecodable image
        ("red", "train", "red a"), ("red", "train", "red b"), ("green", "restval", "green a"),
        ("junk", "train", "junk a"), ("blue", "val", "blue a"), ("grey", "test", "grey a"),
    ]
    table = {
        "image": [{"bytes": pngs.get(c, b"junk bytes"), "path": None} for c, _, _ in rows],
        "filename": [f"{c}.png" for c, _, _ in rows],
        "split": [s for _, s, _ in rows],
        "caption": [t for _, _, t in rows],
    }
    features_spec = datasets.Features(
        {"image": datasets.Image(), "filename": datasets.Value("string"),
         "split": datasets.Value("string"), "caption": datasets.Value("string")}
    )
    datasets.Dataset.from_dict(table, features=features_spec).save_to_disk(str(tmp_path / "saved"))
    with caplog.at_level(logging.WARNING):
        splits = load_real_dataset("flickr30k", tmp_path / "saved", image_size=6)
    train = splits["train"]
    assert train.image_ids == ["red.png", "green.png"] and train.captions_of(0) == ["red a", "red b"]
    assert train.skipped == ["junk.png"] and "skipped 1 of 3 images" in caplog.text
    assert np.abs(train.images[0].astype(int) - COLOURS["red"]).max() <= 2
    assert splits["val"].image_ids == ["blue.png"] and splits["test"].captions == ["grey a"]


def test_hf_imagefolder_by_path_and_its_errors(tmp_path, hf_cache):
    root = tmp_path / "folder"
    for split, colour in [("train", "red"), ("validation", "green"), ("test", "blue")]:
        save_image(root / split / f"{colour}.png", colour)
        rows = [{"file_name": f"{colour}.png", "text": [f"{colour} a", f"{colour} b"]}]
        (root / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = load_real_dataset("coco", root, image_size=4)
    assert splits["val"].image_ids == ["green.png"] and splits["val"].captions == ["green a", "green b"]
    assert splits["test"].images.shape == (1, 4, 4, 3)
    for path in (root / "test").iterdir():
        path.unlink()
    (root / "test").rmdir()
    message = "no 'test' split (looked for test); splits found: ['train', 'validation']"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_hf_dataset(root, 4, cache_dir=hf_cache)


# --- pretrained backbones -------------------------------------------------------------------------


def grace_hopper() -> np.ndarray:
    """matplotlib's sample photograph of Grace Hopper in uniform, centre-cropped to 224 x 224."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not path.is_file():
        pytest.skip(f"matplotlib's sample photograph is not installed ({path})")
    with Image.open(path) as image:
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        crop = image.convert("RGB").crop((left, top, left + side, top + side))
        return np.array(crop.resize((224, 224), Image.Resampling.BICUBIC))


def test_efficientnet_lite0_loads_every_key_and_recognises_a_uniform():
    backbone = image_backbone("efficientnet-lite0", 224)
    assert backbone.incompatible_keys.missing_keys == [] and backbone.incompatible_keys.unexpected_keys == []
    pixels = backbone.pixels(grace_hopper()[None])
    with torch.inference_mode():
        maps, pooled = backbone.features(pixels)
        top5 = backbone.classify(pixels).softmax(-1).topk(5)
    # ImageNet 652 = military uniform, the classic answer for this photograph; 906 = Windsor tie,
    # 457 = bow tie, 834 = suit, 667 = mortarboard are the usual runners-up.
    assert top5.indices[0, 0] == 652 and top5.values[0, 0] > 0.3
    assert set(top5.indices[0].tolist()) <= {652, 906, 457, 834, 667, 400, 617, 887}
    assert [tuple(m.shape[1:]) for m in maps] == [(40, 28, 28), (112, 14, 14), (320, 7, 7)]
    assert backbone.out_channels == (40, 112, 320) and backbone.strides == (8, 16, 32)
    assert pooled.shape == (1, 1280)
    assert not backbone.train().training and not any(p.requires_grad for p in backbone.parameters())
    with pytest.raises(ValueError, match="built for 224"):
        backbone.pixels(np.zeros((1, 64, 64, 3), dtype=np.uint8))


def test_minilm_gives_masked_token_states_and_meaningful_sentence_embeddings():
    encoder = text_backbone()
    captions = ["A dog runs across the grass .", "A puppy is running on a lawn .", "A plate of pasta with red sauce ."]
    with torch.inference_mode():
        out = encoder(captions, max_tokens=32)
    assert out.states.shape[0] == 3 and out.states.shape[2] == 384 and out.mask.shape == out.ids.shape
    assert out.mask.sum(1).tolist() == [len(encoder.tokenizer(c)["input_ids"]) for c in captions]
    assert torch.allclose(out.pooled.norm(dim=-1), torch.ones(3), atol=1e-5)
    similarity = out.pooled @ out.pooled.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3, "the two dog captions are the close pair"
    with torch.inference_mode():
        assert encoder(captions[:1], max_tokens=4).mask.shape == (1, 4), "truncated to max_tokens"


# --- feature cache --------------------------------------------------------------------------------


class Interrupted(Exception):
    """Stands in for a killed process or Ctrl-C in the middle of an extraction."""


def test_feature_extraction_resumes_after_an_interruption(tiny_real, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSLOW_CACHE", str(tmp_path / "cache"))
    params, chunks = FeatureParams(tiny_real), {"images_per_chunk": 2, "captions_per_chunk": 10}
    compute = features._image_features
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args[2])  # the chunk's first image
        if len(calls) == 2:
            raise Interrupted("simulated interruption")
        return compute(*args, **kwargs)

    monkeypatch.setattr(features, "_image_features", interrupted)
    with pytest.raises(Interrupted):
        extract_features(params, "train", device="cpu", **chunks)
    chunk_dirs = list((tmp_path / "cache").glob("features-*.chunks"))
    assert len(chunk_dirs) == 1
    assert [p.name for p in chunk_dirs[0].glob("image-*.pt")] == ["image-00000000-00000002.pt"]

    calls.clear()
    monkeypatch.setattr(features, "_image_features", lambda *a, **k: calls.append(a[2]) or compute(*a, **k))
    resumed = extract_features(params, "train", device="cpu", **chunks)
    assert calls == [2, 4], "only the chunks after the interruption are computed"
    assert not chunk_dirs[0].exists(), "chunks are removed once the set is cached"
    assert [tuple(m.shape) for m in resumed.maps] == [(5, 40, 8, 8), (5, 112, 4, 4), (5, 320, 2, 2)]
    assert resumed.maps[0].dtype == torch.float16 and resumed.caption_states.dtype == torch.float16
    train = load_dataset(tiny_real)["train"]
    assert resumed.image_ids == train.image_ids == ["im0.png", "im2.png", "im3.png", "im4.png", "im5.png"]
    assert resumed.extract_seconds["images"] > 0
    backbone, encoder = image_backbone("efficientnet-lite0", 64), text_backbone()
    with torch.inference_mode():  # all chunks, in order: the backbones' outputs rounded to float16
        maps, pooled = backbone.features(backbone.pixels(train.images))
        text = encoder(train.captions, max_tokens=32)
    assert all(torch.allclose(a.float(), b, atol=2e-2, rtol=1e-2) for a, b in zip(resumed.maps, maps))
    assert torch.allclose(resumed.pooled, pooled, atol=1e-4)
    assert torch.equal(resumed.caption_ids, text.ids) and torch.equal(resumed.caption_mask, text.mask)
    assert torch.allclose(resumed.caption_pooled, text.pooled, atol=1e-4)
    assert torch.equal(resumed.caption_image, torch.as_tensor(train.caption_image))

    calls.clear()
    val = extract_features(params, "val", device="cpu", **chunks)
    test = extract_features(params, "test", device="cpu", **chunks)
    assert calls == [0, 0], "val (carved from train) and test (the dev list) are different images: two entries"
    assert val.image_ids == ["im1.png"] and test.image_ids == ["im6.png", "im7.png"]


# --- the shared Flickr8k sample -------------------------------------------------------------------


def test_shared_flickr8k_sample_loads():
    if not SHARED_FLICKR8K.is_dir():
        pytest.skip(f"the shared Flickr8k sample is not here ({SHARED_FLICKR8K}); tiny datasets cover the loaders")
    splits = load_real_dataset("flickr8k", SHARED_FLICKR8K, 224, max_images={"train": 8, "val": 4, "test": 4})
    assert [len(splits[s]) for s in ("train", "val", "test")] == [8, 4, 4]
    assert all(np.array_equal(np.bincount(s.caption_image), np.full(len(s), 5)) for s in splits.values())
    assert splits["train"].images.shape == (8, 224, 224, 3) and splits["train"].skipped == []
    train, val, test = (splits[s] for s in ("train", "val", "test"))
    assert test.meta["source_split"] == "dev" and val.meta["carved_from"] == "train"
    assert train.meta["of_images"] == 3500 and val.meta["of_images"] == 500 and test.meta["of_images"] == 1000
    listed = {s: (SHARED_FLICKR8K / f"Flickr_8k.{s}Images.txt").read_text().split() for s in ("train", "dev")}
    assert set(val.image_ids) <= set(listed["train"]) and set(test.image_ids) <= set(listed["dev"])
    assert not set(train.image_ids) & set(val.image_ids) and not set(val.image_ids) & set(listed["dev"])


def test_notebook_01_can_show_where_each_split_came_from(flickr8k_many):
    from fastslow.analysis import split_origins

    origins = split_origins(load_flickr8k(flickr8k_many, image_size=8))
    assert origins.loc["val", "carved_from"] == "train"
    assert origins.loc["test", "source_split"] == "dev"
