"""Tests of the video data: the shapes-video generator, clips in the container, the VATEX / MSR-VTT loader."""

from __future__ import annotations

import json
import logging
import re
import sys
import types
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from fastslow.config import DataConfig
from fastslow.data import load_dataset
from fastslow.data.shapes import COLOURS, make_shapes
from fastslow.data.text import split_words
from fastslow.data.types import CaptionedImages, CaptionedVideos
from fastslow.data.video import make_shapes_video, vocabulary
from fastslow.data.video_folder import load_video_captions, sample_frame_indices

# Words of a motion phrase -> the direction it states (written here, not imported, so a phrase
# mapped to the wrong direction in the generator fails the pixel test).
DIRECTION_OF_WORD = {
    "left": "left",
    "right": "right",
    "up": "up",
    "rises": "up",
    "down": "down",
    "falls": "down",
    "still": "still",
    "not": "still",
    "where": "still",
}
STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# Clause separators, longest first; "after" puts the first mover in the second clause.
CLAUSE_SEPARATOR = re.compile(r",? (and then|and meanwhile|then|before|after|while|as|and) (?=the |a )")
ORDER_WORDS = {"and then", "then", "before", "after"}


@pytest.fixture(scope="module")
def clips() -> dict[str, CaptionedVideos]:
    return make_shapes_video(n_train=12, n_val=4, n_test=120, seed=3)


def colour_centroids(clip: np.ndarray, colour: str) -> np.ndarray:
    """(T, 2) the (x, y) centroid of one palette colour (within its jitter) in each frame."""
    distance = np.abs(clip.astype(np.int64) - np.array(COLOURS[colour])).max(axis=-1)
    centroids = []
    for mask in distance <= 25:
        assert mask.sum() > 5, f"{colour} is not visible in a frame"
        rows, columns = np.nonzero(mask)
        centroids.append((columns.mean(), rows.mean()))
    return np.array(centroids)


def clauses(caption: str) -> tuple[list[tuple[str, str | None]], str | None]:
    """[(colour, direction or None)] per clause of a caption, and the connector between clauses."""
    parts = CLAUSE_SEPARATOR.split(caption.removeprefix("first ").removeprefix("at the same time "))
    connector = parts[1] if len(parts) > 1 else None
    found = []
    for clause in parts[::2]:
        words = split_words(clause)
        colours = [w for w in words if w in COLOURS]
        directions = {DIRECTION_OF_WORD[w] for w in words if w in DIRECTION_OF_WORD}
        assert len(colours) == 1 and len(directions) <= 1, f"cannot parse {clause!r} of {caption!r}"
        found.append((colours[0], directions.pop() if directions else None))
    return found, connector


# --- shapes-video -------------------------------------------------------------------------------


def test_clips_have_the_declared_shapes_and_dtypes(clips):
    test = clips["test"]
    assert [len(clips[s]) for s in ("train", "val", "test")] == [12, 4, 120]
    assert test.images.shape == (120, 8, 48, 48, 3) and test.images.dtype == np.uint8
    assert test.frames == 8 and isinstance(test, CaptionedImages)
    assert np.array_equal(np.bincount(test.caption_image), np.full(120, 5))
    assert test.dataset == "shapes-video" and test.image_ids[7] == "shapes-video-test-000007"
    small = make_shapes_video(2, 0, 0, frames=3, image_size=32, captions_per_clip=2)["train"]
    assert small.images.shape == (2, 3, 32, 32, 3) and small.num_captions == 4


def test_clips_are_deterministic_from_the_seed():
    first, again, other = (make_shapes_video(4, 2, 6, seed=seed) for seed in (7, 7, 8))
    for split in ("train", "val", "test"):
        assert np.array_equal(first[split].images, again[split].images)
        assert first[split].captions == again[split].captions
        assert first[split].twin_kind == again[split].twin_kind
        assert not np.array_equal(first[split].images, other[split].images)
    larger = make_shapes_video(30, 2, 6, seed=7)
    assert np.array_equal(first["test"].images, larger["test"].images), "test split independent of n_train"


def test_captions_are_about_motion_and_order_in_a_small_vocabulary(clips):
    captions = clips["train"].captions + clips["test"].captions
    assert {word for caption in captions for word in split_words(caption)} <= set(vocabulary())
    assert len(vocabulary()) <= 75
    kinds = Counter(clips["test"].caption_kind)
    assert set(kinds) == {"full", "partial"} and 0.1 < kinds["partial"] / sum(kinds.values()) < 0.3
    connectors = Counter(clauses(c)[1] for c in clips["test"].captions)
    assert sum(connectors[w] for w in ORDER_WORDS) > 100, "many captions state an order"
    assert connectors["while"] + connectors["as"] + connectors["and meanwhile"] > 50, "and many simultaneity"
    assert any("stays" in c or "does not move" in c for c in captions), "some objects stay still"


def test_objects_move_as_the_captions_say(clips):
    """Track each named colour across the frames: direction, stillness and, for ordered captions,
    that the first-named mover moves in the first half only and the other in the second half only."""
    test = clips["test"]
    half = test.frames // 2
    checked = Counter()
    for j, caption in enumerate(test.captions):
        clip = test.images[test.caption_image[j]]
        found, connector = clauses(caption)
        tracks = {colour: colour_centroids(clip, colour) for colour, _ in found}
        for colour, direction in found:
            track = tracks[colour]
            if direction is None:
                continue
            moved = track[-1] - track[0]
            if direction == "still":
                assert np.abs(track - track[0]).max() < 1.0, f"{caption!r}: {colour} moves"
            else:
                along = moved @ np.array(STEP[direction])
                assert along > 5.0 and np.abs(moved).sum() - along < 1.5, f"{caption!r}: {colour} moved {moved}"
            checked[direction] += 1
        if connector in ORDER_WORDS:
            first, second = (found[1], found[0]) if connector == "after" else (found[0], found[1])
            early, late = tracks[first[0]], tracks[second[0]]
            assert np.abs(early[half] - early[0]).max() > 5 and np.abs(early[-1] - early[half]).max() < 1, caption
            assert np.abs(late[half] - late[0]).max() < 1 and np.abs(late[-1] - late[half]).max() > 5, caption
            checked["order"] += 1
        elif connector in ("while", "as", "and meanwhile") and "still" not in (found[0][1], found[1][1]):
            for colour in tracks:  # moving at the same time: both move in both halves
                assert np.abs(tracks[colour][half] - tracks[colour][0]).max() > 2, caption
                assert np.abs(tracks[colour][-1] - tracks[colour][half]).max() > 2, caption
            checked["together"] += 1
    assert min(checked.values()) >= 10 and len(checked) == 7, checked


def test_twins_differ_only_in_order_or_in_one_direction_word(clips):
    test = clips["test"]
    paired = np.flatnonzero(test.twin >= 0)
    assert len(paired) == 60 and np.array_equal(test.twin[paired], paired ^ 1), "adjacent pairs, half the clips"
    assert {test.twin_kind[i] for i in paired} == {"order_swap", "direction_flip"}
    opposite = {frozenset(p) for p in (("left", "right"), ("up", "down"), ("rises", "falls"))}
    for first in paired[paired % 2 == 0]:
        kind = test.twin_kind[first]
        assert test.twin_kind[first + 1] == kind
        assert not np.array_equal(test.images[first], test.images[first + 1])
        kinds = [test.caption_kind[j] for j in np.flatnonzero(test.caption_image == first)]
        for a, b, caption_kind in zip(test.captions_of(first), test.captions_of(first + 1), kinds):
            words_a, words_b = split_words(a), split_words(b)
            if kind == "order_swap":
                assert sorted(words_a) == sorted(words_b), (a, b)
                if caption_kind == "full":
                    assert a != b, "a full caption states the order"
            else:
                differing = [{x, y} for x, y in zip(words_a, words_b) if x != y]
                assert len(words_a) == len(words_b) and len(differing) <= 1, (a, b)
                assert all(frozenset(d) in opposite for d in differing), (a, b)
                if caption_kind == "full":
                    assert len(differing) == 1, "a full caption names both directions"


def test_twin_fraction_and_bad_arguments():
    assert np.all(make_shapes_video(0, 0, 10, twin_fraction=0.0)["test"].twin == -1)
    assert np.all(make_shapes_video(0, 0, 10, twin_fraction=1.0)["test"].twin >= 0)
    for kwargs in ({"frames": 2}, {"image_size": 24}, {"captions_per_clip": 0}, {"twin_fraction": -0.1}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            make_shapes_video(2, 2, 2, **kwargs)


def test_load_dataset_builds_shapes_video_with_the_configured_frames():
    splits = load_dataset(DataConfig(dataset="shapes-video", n_train=4, n_val=2, n_test=2, image_size=32, frames=5))
    assert splits["train"].images.shape == (4, 5, 32, 32, 3)
    assert load_dataset(DataConfig(n_train=2, n_val=2, n_test=2, frames=5))["train"].frames == 1


# --- clips in the container ---------------------------------------------------------------------


def test_container_subsets_clips_and_checks_their_shape(clips):
    test = clips["test"]
    sub = test.subset([3, 2, 9])
    assert sub.images.shape == (3, 8, 48, 48, 3) and sub.frames == 8
    assert np.array_equal(sub.images[0], test.images[3]) and sub.captions_of(2) == test.captions_of(9)
    assert sub.twin[:2].tolist() == [1, 0] and sub.twin_kind[0] == test.twin_kind[3]
    assert make_shapes(2, 0, 0)["train"].frames == 1
    fields = dict(vars(sub))
    with pytest.raises(ValueError, match=r"\(N, T, H, W, 3\) uint8"):
        CaptionedVideos(**fields | {"images": sub.images.astype(np.float32)})
    with pytest.raises(ValueError, match="uint8"):
        CaptionedVideos(**fields | {"images": sub.images[..., None]})


# --- VATEX / MSR-VTT loader ---------------------------------------------------------------------


def write_frames(folder, levels, size=(12, 10)) -> None:
    """Frames 1.png, 2.png, ... whose red level tells which frame was read."""
    folder.mkdir(parents=True)
    for number, level in enumerate(levels, start=1):
        Image.new("RGB", size, (level, 0, 0)).save(folder / f"{number}.png")


@pytest.fixture
def vatex(tmp_path):
    """clipA: 10 frames; clipB: 3 frames (fewer than asked); clipC: a corrupt frame; clipD: missing."""
    root = tmp_path / "vatex"
    write_frames(root / "frames" / "clipA", [20 * k for k in range(10)])
    write_frames(root / "frames" / "clipB", [5, 6, 7])
    write_frames(root / "frames" / "clipC", [1, 2, 3, 4])
    (root / "frames" / "clipC" / "3.png").write_bytes(b"not a png")
    records = [
        {"videoID": "clipA", "enCap": ["a man runs", " a man is running "], "chCap": ["..."]},
        {"videoID": "clipC", "enCap": ["broken"]},
        {"videoID": "clipD", "enCap": ["nowhere"]},
        {"videoID": "clipB", "enCap": ["short"]},
    ]
    (root / "vatex_training_v1.0.json").write_text(json.dumps(records))
    return root


def test_frame_indices_are_spread_uniformly():
    assert sample_frame_indices(10, 4).tolist() == [1, 3, 6, 8]
    assert sample_frame_indices(3, 4).tolist() == [0, 1, 1, 2]
    assert sample_frame_indices(8, 8).tolist() == list(range(8))


def test_vatex_loads_samples_frames_and_counts_skipped_clips(vatex, caplog):
    with caplog.at_level(logging.WARNING, logger="fastslow.data.video_folder"):
        data = load_video_captions(vatex, "train", frames=4, image_size=8)
    assert data.dataset == "vatex" and data.split == "train" and data.frames == 4
    assert data.image_ids == ["clipA", "clipB"] and data.images.shape == (2, 4, 8, 8, 3)
    # frames 1..10 sorted by number (not "1, 10, 2"), the middles of 4 segments: 2, 4, 7, 9.
    assert data.images[0, :, 4, 4, 0].tolist() == [20, 60, 120, 160]
    assert data.images[1, :, 4, 4, 0].tolist() == [5, 6, 6, 7]
    assert data.captions_of(0) == ["a man runs", "a man is running"] and data.captions_of(1) == ["short"]
    assert sorted(p.split("/")[-1] for p in data.skipped) == ["clipC", "clipD"]
    assert "skipped 2 of 4 clips" in caplog.text
    capped = load_video_captions(vatex, "train", frames=2, image_size=8, max_clips=1)
    assert capped.image_ids == ["clipA"]


def test_msrvtt_loads_the_clips_of_the_split(tmp_path):
    root = tmp_path / "msrvtt"
    for number, level in enumerate((10, 50, 90)):
        write_frames(root / "frames" / f"video{number}", [level] * 5)
    content = {
        "videos": [
            {"video_id": "video0", "split": "train"},
            {"video_id": "video1", "split": "validate"},
            {"video_id": "video2", "split": "test"},
        ],
        "sentences": [
            {"video_id": "video1", "caption": "a cat jumps", "sen_id": 0},
            {"video_id": "video0", "caption": "a dog barks", "sen_id": 1},
            {"video_id": "video1", "caption": "a cat plays", "sen_id": 2},
            {"video_id": "video2", "caption": "people sing", "sen_id": 3},
        ],
    }
    (root / "videodatainfo.json").write_text(json.dumps(content))
    val = load_video_captions(root, "val", frames=3, image_size=6, dataset="msrvtt")
    assert val.dataset == "msrvtt" and val.image_ids == ["video1"] and val.images.shape == (1, 3, 6, 6, 3)
    assert val.captions == ["a cat jumps", "a cat plays"] and np.all(val.images[..., 0] == 50)
    assert load_video_captions(root, "test", frames=3, image_size=6).captions == ["people sing"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[{", "is not valid JSON"),
        ([{"videoID": "clipA"}], r"record 0 \('clipA'\) has no 'enCap' list"),
        ([{"videoID": "clipA", "enCap": ["ok", " "]}], r"record 0 \('clipA'\) has an empty caption"),
        ([{"enCap": ["no id"]}], "record 0 has no 'videoID'"),
        ({"videos": [{"video_id": "clipA", "split": "train"}], "sentences": [{"video_id": "clipA"}]},
         r"sentences\[0\] needs 'video_id' and 'caption'"),
        ({"videos": [{"video_id": "clipA", "split": "train"}], "sentences": []}, "have no sentences, e.g. 'clipA'"),
        ({"videos": [{"video_id": "clipA"}], "sentences": []}, r"videos\[0\] needs 'video_id' and 'split'"),
        ({"annotations": []}, r"neither VATEX .* found an object with keys \['annotations'\]"),
        ([], "has no clips for split 'train'"),
    ],
)
def test_bad_captions_files_raise_errors_naming_the_file_and_record(vatex, content, message):
    path = vatex / "vatex_training_v1.0.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=message) as error:
        load_video_captions(vatex, "train", frames=2, image_size=8)
    assert str(path) in str(error.value)


def test_missing_folders_and_files_are_named(tmp_path, vatex):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        load_video_captions(tmp_path / "nowhere", "train", 2, 8)
    with pytest.raises(FileNotFoundError, match="no captions file for split 'val'.*vatex_validation_v1.0.json"):
        load_video_captions(vatex, "val", 2, 8)
    (vatex / "frames").rename(vatex / "elsewhere")
    with pytest.raises(FileNotFoundError, match=re.escape(str(vatex / "frames")) + ".*videos"):
        load_video_captions(vatex, "train", 2, 8)
    (vatex / "videos").mkdir()
    with pytest.raises(ValueError, match="no readable clips for split 'train'.*all 4 were skipped"):
        load_video_captions(vatex, "train", 2, 8)


def test_video_files_need_a_decoder_and_the_error_says_what_to_do(vatex, monkeypatch):
    (vatex / "videos").mkdir()
    (vatex / "videos" / "clipD.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(ImportError, match=re.escape(str(vatex / "videos" / "clipD.mp4")) + ".*pip install av.*frames"):
        load_video_captions(vatex, "train", 2, 8)


def test_video_files_are_decoded_with_pyav_when_it_is_installed(vatex, monkeypatch):
    """A stand-in for the part of PyAV's API the loader uses: av.open(path).decode(video=0)."""

    class Container:
        def __init__(self, path: str) -> None:
            if path.endswith("broken.mp4"):
                raise OSError("invalid data")
            self.levels = [10 * k for k in range(12)]

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            return None

        def decode(self, video: int):
            assert video == 0
            return (types.SimpleNamespace(to_image=lambda v=v: Image.new("RGB", (20, 16), (v, 0, 0))) for v in self.levels)

    fake_av = types.SimpleNamespace(open=Container, error=types.SimpleNamespace(FFmpegError=RuntimeError))
    monkeypatch.setitem(sys.modules, "av", fake_av)
    (vatex / "videos").mkdir()
    (vatex / "videos" / "clipD.mp4").write_bytes(b"fake")
    records = json.loads((vatex / "vatex_training_v1.0.json").read_text())
    records.append({"videoID": "broken", "enCap": ["never decodes"]})
    (vatex / "vatex_training_v1.0.json").write_text(json.dumps(records))
    (vatex / "videos" / "broken.mp4").write_bytes(b"fake")
    data = load_video_captions(vatex, "train", frames=3, image_size=8)
    assert data.image_ids == ["clipA", "clipD", "clipB"]
    assert data.images[1, :, 4, 4, 0].tolist() == [20, 60, 100]  # frames 2, 6, 10 of 12
    assert sorted(p.split("/")[-1] for p in data.skipped) == ["broken.mp4", "clipC"]


def test_a_real_mp4_written_with_pyav_decodes_into_its_frames(tmp_path):
    av = pytest.importorskip("av", reason="PyAV is the optional extra `pip install -e '.[video]'`; "
                             "without it the loader asks for it (test above)")
    root = tmp_path / "vatex"
    (root / "videos").mkdir(parents=True)
    (root / "vatex_training_v1.0.json").write_text(json.dumps([{"videoID": "clip", "enCap": ["it brightens"]}]))
    levels = [20 * k for k in range(12)]  # each frame a flat grey, brighter in time
    with av.open(str(root / "videos" / "clip.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for level in levels:
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), level, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = load_video_captions(root, "train", frames=3, image_size=8)
    assert data.images.shape == (1, 3, 8, 8, 3) and data.captions == ["it brightens"]
    # Frames 2, 6 and 10 of 12 (sample_frame_indices), to within lossy coding.
    np.testing.assert_allclose(data.images[0, :, 4, 4].mean(-1), [levels[2], levels[6], levels[10]], atol=8)


def test_clip_strip_draws_each_clip_in_a_row_under_its_first_caption(clips):
    import matplotlib.pyplot as plt

    from fastslow.plots import clip_strip

    test = clips["test"]
    fig = clip_strip(test, [0, 5])
    assert len(fig.axes) == 2 * test.frames
    assert test.captions_of(5)[0] in fig.subfigs[1].get_suptitle().replace("\n", " ")
    plt.close(fig)


def test_the_generator_keeps_each_objects_centre_and_the_strip_draws_its_motion(clips):
    import matplotlib.pyplot as plt
    from matplotlib.text import Annotation

    from fastslow.plots import MOTION_MIN_PIXELS, clip_strip

    test = clips["test"]
    assert test.centres.shape == (120, 8, 2, 2)
    # Each object is drawn where its centre says: the pixel there is the object's, not the dark
    # background's (whose brightest channel stays below about 60).
    x, y = np.rint(test.centres[..., 0]).astype(int), np.rint(test.centres[..., 1]).astype(int)
    clip, frame = np.indices(x.shape[:2])
    for obj in (0, 1):
        assert test.images[clip, frame, y[..., obj], x[..., obj]].max(-1).min() > 100
    sub = test.subset([9, 3])
    assert np.array_equal(sub.centres, test.centres[[9, 3]])
    with pytest.raises(ValueError, match="centres"):
        CaptionedVideos(**dict(vars(sub)) | {"centres": sub.centres[:, :2]})
    fig = clip_strip(test, [0, 5])
    arrows = [a for ax in fig.axes for a in ax.texts if isinstance(a, Annotation)]
    steps = np.abs(np.diff(test.centres[[0, 5]], axis=1)).max(-1)
    assert len(arrows) == int((steps >= MOTION_MIN_PIXELS).sum()) > 0
    plt.close(fig)

