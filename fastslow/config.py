"""The study's configuration: one frozen dataclass tree, built from a named profile.

A profile is data (a :class:`Profile` per name), not ``if`` chains through the code. Everything a
trained artifact depends on lives in :class:`StudyConfig`, so hashing the relevant part of it keys
the cache (:mod:`fastslow.cache`): a changed parameter never reuses a stale model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any

# Field metadata: a setting added after models were cached enters config hashes (cache keys) only
# when it differs from its default, so everything trained without it keeps its key.
KEYED_WHEN_SET = "keyed_when_set"

DATASETS = ("shapes", "shapes-video", "folder", "flickr8k", "flickr30k", "coco", "vatex", "msrvtt")
REPO_ROOT = Path(__file__).resolve().parents[1]

GENERATED_DATASETS = ("shapes", "shapes-video")  # made by the package, no data_dir
VIDEO_DATASETS = ("shapes-video", "vatex", "msrvtt")  # captioned clips: a profile's video sizes apply
BACKBONES = ("tiny", "pretrained")
# EfficientNet-Lite0's ImageNet input size: the pretrained backbone sees images at this size.
PRETRAINED_IMAGE_SIZE = 224


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "shapes"
    data_dir: str | None = None
    n_train: int = 8000
    n_val: int = 500
    n_test: int = 1000
    image_size: int = 48
    captions_per_image: int = 5
    seed: int = 0
    frames: int = 8  # frames per clip of a video dataset; image datasets ignore it


@dataclass(frozen=True)
class EncoderConfig:
    """Sizes of the image and text towers (the ``tiny`` backbone trains them from scratch)."""

    backbone: str = "tiny"
    channels: tuple[int, ...] = (32, 48, 64, 96)
    text_width: int = 128
    text_layers: int = 2
    heads: int = 4
    max_caption_tokens: int = 24
    # Words seen fewer times in the training captions become <unk> (real captions have a long tail
    # of rare words; 5 is the threshold of the Karpathy-split preprocessing). The generated data's
    # vocabulary is small and every word is frequent.
    min_word_count: int = 1
    pretrained_text_width: int = 384  # MiniLM-L6's sentence embedding (backbone "pretrained")


TEMPORAL_POOLINGS = ("mean", "transformer")


@dataclass(frozen=True)
class DualEncoderConfig:
    """The Fast model. ``temporal``: how a clip's per-frame embeddings become one (images have one
    frame and ignore it): ``mean`` (order-blind: a clip and its frames shuffled embed alike) or
    ``transformer`` (one self-attention layer over the frames with learned time positions, then the
    mean, so the order of events can count)."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    embed_dim: int = 128
    init_temperature: float = 0.07
    temporal: str = "mean"


OBJECTIVES = ("bidirectional", "forward", "itm")
TOWER_INITS = ("dual_encoder", "scratch")


@dataclass(frozen=True)
class CrossAttentionConfig:
    """The Slow model: image tower, progressive upsampler and caption decoders.

    ``objective``: ``bidirectional`` (forward + backward captioning likelihood), ``forward``
    (left-to-right captioning only) or ``itm`` (binary image-text matching with hard negatives).
    ``upsample_steps``: x2 upsampling steps from the tower's coarsest map (0 = coarse map only).
    ``tower_init``: ``dual_encoder`` starts the image tower from the trained Fast model's (the
    papers start both models from a pretrained backbone; the ``tiny`` one has no other), ``scratch``
    from random weights. From scratch the captioning loss learns colours within an epoch but shapes
    only after many more, which the quick profile's budget does not have.
    ``train_tower``: fine-tune the tower, or keep it frozen (then Fast and Slow see the same visual
    features and differ only in how they compare them with the caption; a step costs about half).
    ``layers``: decoder layers per direction. Everything after the first layer's self-attention
    runs once per (caption, image) pair, so depth and ``ffn_ratio`` set the cost per pair.
    """

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    upsample_steps: int = 1
    objective: str = "bidirectional"
    tower_init: str = "dual_encoder"
    train_tower: bool = False
    width: int = 64
    layers: int = 1
    heads: int = 4
    ffn_ratio: int = 2
    # Early stopping validates retrieval on the first caption of this many validation images: the
    # Slow model scores every pair, so the full validation split would cost more than an epoch.
    validation_images: int = 150
    # Weight of the look-alike term of the captioning objectives: listwise cross-entropy of the
    # caption's score under its own image against mined look-alike images (batches that carry them).
    negative_weight: float = 1.0
    # Negatives mined with the Fast model (backbone "pretrained", fastslow.negatives): per caption
    # (and per image) its `negatives_pool` most similar other images (captions), of which each
    # epoch draws `hard_negatives` (the matching model: groups of 1 + `hard_negatives` look-alikes
    # per batch, the rest of the batch random). Harder ones did worse on Flickr8k (seed 0, 8 epochs,
    # weights averaged; 2,500 validation captions): t2i R@1 alone 20.0 at (30, 4), 18.5 at (10, 4),
    # 17.4 at (30, 9); added to the Fast score at K = 5, 21.9, 21.5 and 21.6: a caption's nearest
    # images are often ones it describes too.
    negatives_pool: int = 30
    hard_negatives: int = 4
    # Captioning objectives on data with twins (``tiny`` backbone): each caption's look-alike is
    # its image's twin when the caption describes all of it (a random other image otherwise).
    # Likelihood alone never needs what tells twins apart: on ``shapes-video`` (quick, 30 epochs)
    # the order test's order swaps stayed at 48% without it and reached 70% with it (83% at
    # negative_weight 3, the weight validation chose: VideoProfile.look_alike_weight).
    twin_negatives: bool = field(default=False, metadata={KEYED_WHEN_SET: True})


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    patience: int = 3
    grad_clip: float = 1.0
    # Polyak averaging: the decay per step of an exponential moving average of the weights, which
    # validation, early stopping and the kept model then use (0: the weights as trained). Where
    # validation swings from epoch to epoch (the matching model on Flickr8k), the average of the
    # last steps ranks better than the weights of any one of them (fastslow.train.fit).
    weight_average: float = field(default=0.0, metadata={KEYED_WHEN_SET: True})


@dataclass(frozen=True)
class CrossAblationConfig:
    """Notebook 03's ablations of the Slow model (upsampling steps, training objective): every
    variant trains with ``train`` (a smaller budget than the main model's, so that all of them fit
    the profile's time; the objective variants are also the kinds the study chooses its Slow model
    among, :func:`fastslow.stages.best_slow_model`) and is scored on the first ``queries`` headline
    queries against the whole test gallery; the variants are compared among themselves.
    ``queries = 0`` skips the scoring (the rows are then absent)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    queries: int = 1000
    upsample_steps: tuple[int, ...] = (0, 1, 2)  # the variants of the upsampling ablation


@dataclass(frozen=True)
class DistillConfig:
    """Slow -> Fast distillation while the student learns (:mod:`fastslow.distill`): notebook 02's
    dual encoder, trained with its recipe (``train_dual``) plus a distillation term over each
    caption's ``candidates`` in-batch images (its own and the Fast model's hardest), which the
    teacher scores; ``seeds``: the runs of each method (the control of a seed is notebook 02's dual
    encoder trained with that seed).

    TFS's weight and teacher temperature were chosen on validation: `shapes`, seed 0, t2i R@1 on
    the first caption of the 500 validation images and validation RSUM, the control (notebook 02's
    dual encoder) at 27.4 and 409. (lambda, tau): (0.5, 2) 32.6 and 431, (0.5, 4) 32.6 and 428,
    (0.5, 1) 31.0 and 426, (0.25, 2) 30.6 and 425, (1, 1) 29.6 and 427, (1, 0.5) 27.4 and 416,
    (5, 0.5) 23.4 and 371: a soft, light teacher term helps; a heavy or sharp one pulls the student
    below its control. DCD's numbers are its official code's."""

    candidates: int = 16
    tfs_candidates: int = 8  # the positive and the Fast model's 7 hardest: DCD's kept set's size
    tfs_weight: float = 0.5
    tfs_temperature: float = 2.0
    # DCD's code: the teacher keeps 7 negatives and the loss puts 0.2 on the distillation term.
    dcd_kept: int = 7
    dcd_distillation_weight: float = 0.2
    seeds: tuple[int, ...] = (0, 1, 2)
    # The ablation "fine-tune a converged dual encoder" (the study's first recipe, fixed): notebook
    # 02's dual encoder trained on with the TFS term for a few epochs, restarting at a twentieth of
    # its training's peak learning rate.
    finetune_epochs: int = 2
    finetune_lr: float = 1e-4


@dataclass(frozen=True)
class LargerGallery:
    """A generated shapes gallery beyond the test split (its own seed, never trained on), for the
    speed-up at scale: ``size`` images, the first caption of ``queries`` of them as queries, and
    the Slow model alone timed on ``slow_only_latency_queries`` typed captions (at 100,000 images
    one costs seconds; Fast+Slow is timed on ``latency_queries`` as everywhere). ``index``: the
    FAISS factory of the Fast side's index; text-to-image search ranks by what it returns."""

    size: int
    queries: int
    slow_only_latency_queries: int
    index: str = "Flat"


@dataclass(frozen=True)
class RerankConfig:
    """Fast+Slow re-ranking and its benchmarks (:mod:`fastslow.rerank`, :mod:`fastslow.bench`)."""

    alphas: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0, 3.0)  # candidates for the fast-score weight, chosen on validation
    alpha_k: int = 10  # the K at which alpha is chosen
    validation_queries: int = 300
    # Where the paper's "orders of magnitude" live. At 100,000 images exact search costs ~2 ms a
    # query, as much as re-ranking 20 candidates; HNSW takes ~0.1 ms (recall@10 0.99, notebook 05).
    larger_galleries: tuple[LargerGallery, ...] = (
        LargerGallery(5_000, 200, 20), LargerGallery(100_000, 50, 2, index="HNSW16"),
    )
    latency_queries: int = 20
    # Queries in a batch when measuring throughput (queries per second, every core), as a service
    # that gathers the queries of many users would run them.
    throughput_batch: int = 32
    scale_sizes: tuple[int, ...] = (1_000, 10_000, 100_000, 1_000_000)
    approximate_indexes: tuple[tuple[str, str], ...] = (("HNSW", "HNSW16"), ("IVF-PQ", "IVF{nlist},PQ16x4fs"))
    # The index sharded (fastslow.index.VectorIndex.build_sharded): this many items (the test
    # gallery, then filler vectors) written in each of these numbers of shards, each shard indexed
    # with each factory ({nlist}: sqrt of the shard's size). IVF-Flat searches nprobe lists of
    # every shard: at 1M items on the shapes quick run's vectors, recall@10 against exact on 1,000
    # queries was 0.944 (2 shards) and 0.958 (4) at nprobe 8, 0.993 and 0.994 at 16, 0.9996 and
    # 0.9994 at 32 (the search time about doubling from 8 to 32): 16 clears 0.95 with room to spare.
    sharded_items: int = 1_000_000
    index_shards: tuple[int, ...] = (2, 4)
    sharded_indexes: tuple[tuple[str, str], ...] = (("exact", "Flat"), ("IVF-Flat", "IVF{nlist},Flat"))
    sharded_ivf_nprobe: int = 16
    # Latency timed with the models compiled (:func:`fastslow.bench.compiled`), as a service would
    # run them; the smoke profile leaves them as written (compiling costs it ~20 s a model).
    compiled_queries: bool = True


@dataclass(frozen=True)
class PretrainedBudget:
    """What a profile changes for the ``pretrained`` backbone.

    The Fast heads on frozen features train in seconds, but on real captions every Slow candidate
    costs far more per pair than on ``shapes``: the caption decoders' softmax spans some 2,000 word
    pieces instead of ~50 words, every candidate works on a 14x14 grid of 112- and 320-channel
    features instead of 6x6, and each training step scores mined negatives besides the pairs. These budgets aim to keep the whole quick study on Flickr8k
    (3,500 training images, a 1,000-image dev gallery) within about half an hour on 2 cores:
    ``headline_captions_per_image``: every caption of every test image is a headline query
    (Flickr30K's protocol, 5,000 queries on 1,000 images): the Slow-only pass over their 5,000,000
    pairs took 111 s with the three-seed matching model, and the paired intervals narrowed to about
    a third of the 500 first captions' (+-3 R@1 points there);
    ``cross_ablation`` is the budget every Slow kind is tried on (only the chosen kind then trains
    on ``train_cross``), scores the ablations on fewer queries and leaves out the stride-8 map;
    ``rerank`` measures latency on fewer queries and the index scaling and the sharded index at
    100k only (the 1M benchmarks of the shapes run measure the same indexes on the same kind of
    vectors).
    """

    train_cross: TrainConfig
    cross_ablation: CrossAblationConfig
    headline_captions_per_image: int
    rerank: RerankConfig
    # The study's Slow model: the mean of this many models of the chosen kind, trained with seeds
    # seed, seed + 1, ... (fastslow.models.matching.SlowEnsemble).
    slow_members: int = 1


# The Slow models on real photographs: the matching model (fastslow.models.matching, "itm",
# trained from scratch: started from the Fast heads it got worse) and caption decoders of two
# layers. The matching model's first form, an ALBEF-style cross-encoder, is described there.
# The matching model attends to the 7x7 map (no upsampling): at stride 16 (14x14) a training step
# cost 6 s against 1.1 s at batch 128 on 2 cores, more than the quick budget holds; notebook 03's
# upsampling ablation measures the finer map on the ablations' budget.
PRETRAINED_SLOW = {"objective": "itm", "tower_init": "scratch", "layers": 2, "upsample_steps": 0}


@dataclass(frozen=True)
class VideoProfile:
    """What a profile uses instead of its image sizes on a video dataset (:data:`VIDEO_DATASETS`).

    A clip costs T frames' worth of image tower in every training step, embedding and visual-token
    pass, and the Slow model attends over T times as many visual tokens per pair, so the image sizes
    would take about T times as long. Measured on 2 CPU cores (quick, ``shapes-video``): at 32 px a
    frame costs about a third of a 48 px image (a dual-encoder epoch of 1,600 clips of 4 frames
    takes ~5 s, of 1,200 clips of 8 frames ~5.5 s), and with one upsampling step a frame gives the
    Slow model a 4x4 grid, 64 tokens for 4 frames (a 48 px image gives 36). Quick: at a fixed
    budget, 1,600 clips of 4 frames trained the dual encoder to a higher validation RSUM than 1,200
    clips of 8 (303 vs 257 of 600 on 150 clips): more clips helped more than finer time, and 4
    frames still show both motions and their order (the first mover during frames 0-2, the second
    during 2-3). Distillation runs one seed (each run trains a dual encoder on clips, with the teacher's
    pass over every epoch's candidates). ``full`` (a GPU) goes back to 48 px and 8 frames.
    """

    data: DataConfig
    train_dual: TrainConfig
    distill: DistillConfig
    train_cross: TrainConfig
    # The Slow model learns from each clip's twin (CrossAttentionConfig.twin_negatives): without it
    # no model told an order swap from its twin. The look-alike term's weight (negative_weight) was
    # chosen on validation (quick, 30 epochs): validation RSUM 401 at 1, 436 at 3; 405 at 3 after
    # 20 epochs. The same runs printed the order test on test clips (order swaps 70% and 83%), and
    # weight 3 was tried after seeing weight 1's: kept because validation prefers it.
    twin_negatives: bool = True
    look_alike_weight: float = 3.0
    # Latency on clips is timed as written (RerankConfig.compiled_queries off): compiling bought the
    # small video models almost nothing and cost notebook 06 about a minute. Quick, shapes-video,
    # one thread, 20 typed captions, compiled against as written: Fast 0.84 / 0.81 ms, Slow-only
    # 21.0 / 21.7 ms, Fast+Slow at K = 20 3.3 / 3.5 ms; the latency cells took 63 s compiled (with
    # torch.compile's cache empty) against 8 s.
    compiled_queries: bool = False


@dataclass(frozen=True)
class Profile:
    """How big a run is: data sizes, training budgets and evaluation sizes (``video``: the sizes
    used instead on a video dataset)."""

    name: str
    data: DataConfig
    train_dual: TrainConfig
    distill: DistillConfig
    train_cross: TrainConfig
    cross_ablation: CrossAblationConfig
    rerank: RerankConfig
    # Captions per test image used as queries in the comparable ("headline") evaluation. The Slow
    # model scores every (query, image) pair, so its cost sets this number.
    headline_captions_per_image: int
    video: VideoProfile
    pretrained: PretrainedBudget | None = None


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        data=DataConfig(n_train=512, n_val=64, n_test=100),
        train_dual=TrainConfig(epochs=2, batch_size=64, patience=2),
        distill=DistillConfig(seeds=(0, 1)),
        train_cross=TrainConfig(epochs=2, batch_size=64, patience=2),
        cross_ablation=CrossAblationConfig(TrainConfig(epochs=1, batch_size=64), queries=100),
        rerank=RerankConfig(
            validation_queries=50, larger_galleries=(LargerGallery(300, 30, 5),), latency_queries=5,
            throughput_batch=8, scale_sizes=(1_000, 10_000), compiled_queries=False,
            sharded_items=10_000, index_shards=(2,),
        ),
        headline_captions_per_image=1,
        video=VideoProfile(
            data=DataConfig(n_train=128, n_val=32, n_test=48, image_size=32, frames=4),
            train_dual=TrainConfig(epochs=1, batch_size=32, patience=1),
            distill=DistillConfig(seeds=(0,)),
            train_cross=TrainConfig(epochs=1, batch_size=32, patience=1),
        ),
    ),
    "quick": Profile(
        name="quick",
        data=DataConfig(n_train=6000, n_val=500, n_test=1000),
        train_dual=TrainConfig(epochs=10, batch_size=128),
        distill=DistillConfig(),
        train_cross=TrainConfig(epochs=8, batch_size=128),
        cross_ablation=CrossAblationConfig(TrainConfig(epochs=3, batch_size=128), queries=200),
        rerank=RerankConfig(),
        headline_captions_per_image=1,
        video=VideoProfile(
            data=DataConfig(n_train=1600, n_val=150, n_test=300, image_size=32, frames=4),
            train_dual=TrainConfig(epochs=10, batch_size=64),
            distill=DistillConfig(seeds=(0,)),
            # With twin negatives validation RSUM rose until about epoch 20 (163 after one epoch,
            # 345 after 7, ~400 from 20 on); an epoch takes ~3.5 s.
            train_cross=TrainConfig(epochs=30, batch_size=64, patience=5),
        ),
        pretrained=PretrainedBudget(
            # The chosen Slow kind's full budget: the matching model, at the Fast model's batch
            # and learning rate (its loss is the same contrastive one over the batch). Validation
            # t2i R@1 on 500 images by epoch, in a first form of the model: 10.6 14.2 16.2 17.8
            # 19.0 19.4 19.8 21.0 (the Fast model: 20.2). A step costs ~1.1 s on 2 cores, ~30 s
            # an epoch. Its validation swings by a point from epoch to epoch, and early stopping on
            # 150 images kept epoch 6 of 8 for two seeds of three; the moving average of the
            # weights (decay 0.98 a step, ~27 steps an epoch) smooths both. On every caption of
            # the 500 validation images (Fast: 19.8), seeds 0, 1, 2 after 8 epochs: 19.4, 18.4,
            # 18.7 as trained, 20.0, 19.2, 19.4 averaged; the three seeds' mean 22.0 and 22.2
            # (21.0 early-stopped without the average). 16 epochs at decay 0.99 (seed 0): 20.8
            # after 10, 19.0 after 13.
            train_cross=TrainConfig(epochs=8, batch_size=128, lr=2e-3, patience=3, weight_average=0.98),
            # Stride 8 (two steps: 28x28 = 784 visual tokens) costs about four times stride 16 per
            # pair in training and scoring: more than the quick budget holds.
            cross_ablation=CrossAblationConfig(
                TrainConfig(epochs=2, batch_size=64, lr=1e-3), queries=200, upsample_steps=(0, 1)
            ),
            headline_captions_per_image=5,
            rerank=RerankConfig(
                validation_queries=2500, latency_queries=5, scale_sizes=(1_000, 10_000, 100_000),
                sharded_items=100_000,
            ),
            slow_members=3,
        ),
    ),
    "full": Profile(
        name="full",
        data=DataConfig(n_train=40000, n_val=1000, n_test=1000, image_size=64),
        train_dual=TrainConfig(epochs=40, batch_size=256, patience=5),
        distill=DistillConfig(),
        train_cross=TrainConfig(epochs=30, batch_size=256, patience=5),
        cross_ablation=CrossAblationConfig(TrainConfig(epochs=15, batch_size=256, patience=5), queries=1000),
        rerank=RerankConfig(
            larger_galleries=(LargerGallery(5_000, 1000, 100), LargerGallery(100_000, 200, 5, index="HNSW16")),
            latency_queries=100,
            scale_sizes=(1_000, 10_000, 100_000, 1_000_000, 10_000_000),
        ),
        headline_captions_per_image=5,
        video=VideoProfile(
            data=DataConfig(n_train=10000, n_val=500, n_test=1000),
            train_dual=TrainConfig(epochs=30, batch_size=128, patience=5),
            distill=DistillConfig(),
            train_cross=TrainConfig(epochs=20, batch_size=128, patience=5),
        ),
    ),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}") from None


def default_profile() -> str:
    """The profile a notebook runs when papermill does not override it."""
    return os.environ.get("FASTSLOW_PROFILE", "quick")


def default_device() -> str:
    return "cuda" if "cuda" in available_devices() else "cpu"


# Where a GPU driver shows itself (NVIDIA's, AMD ROCm's, WSL's). Without any of them torch sees no
# GPU, and saying so needs no `import torch`, which takes seconds: run_all.sh checks `device` in less.
GPU_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/kfd", "/dev/dxg")


def available_devices() -> tuple[str, ...]:
    """The devices this machine runs on: the CPU, and with a GPU torch can use ``cuda`` and
    ``cuda:<index>``."""
    if not any(os.path.exists(path) for path in GPU_DRIVER_FILES):
        return ("cpu",)
    import torch  # here, not at the top: the reporting layer reads configs without torch

    if not torch.cuda.is_available():
        return ("cpu",)
    return ("cpu", "cuda", *(f"cuda:{index}" for index in range(torch.cuda.device_count())))


@dataclass(frozen=True)
class StudyConfig:
    profile: str
    data: DataConfig
    dual: DualEncoderConfig
    train_dual: TrainConfig
    distill: DistillConfig
    cross: CrossAttentionConfig
    train_cross: TrainConfig
    cross_ablation: CrossAblationConfig
    rerank: RerankConfig
    headline_captions_per_image: int
    slow_members: int = 1  # PretrainedBudget.slow_members
    seed: int = 0
    device: str = "cpu"

    @property
    def run_name(self) -> str:
        """Names ``results/<run>/``: the profile and the dataset."""
        return f"{self.profile}-{self.data.dataset}"


def make_config(
    profile: str | None = None,
    dataset: str = "shapes",
    data_dir: str | None = None,
    backbone: str = "tiny",
    seed: int = 0,
    device: str | None = None,
) -> StudyConfig:
    """Build the configuration a notebook's ``parameters`` cell asks for, validating every name."""
    chosen = get_profile(profile or default_profile())
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if device is not None and device not in (devices := available_devices()):
        raise ValueError(f"device {device!r} is not available on this machine; choose one of {', '.join(devices)}")
    if dataset not in GENERATED_DATASETS and not data_dir:
        raise ValueError(f"dataset {dataset!r} needs data_dir: the folder that holds it")
    video = chosen.video if dataset in VIDEO_DATASETS else None
    if video is not None and backbone != "tiny":
        raise ValueError(f"backbone {backbone!r} on the video dataset {dataset!r}: pretrained video towers are not built; use backbone='tiny'")
    sizes = video or chosen  # the fields the two share: data and training budgets
    # The data seed stays fixed: runs with other training seeds are evaluated on the same test set.
    data = dataclasses.replace(sizes.data, dataset=dataset, data_dir=data_dir)
    if backbone == "pretrained":
        data = dataclasses.replace(data, image_size=PRETRAINED_IMAGE_SIZE)
    encoder = EncoderConfig(backbone=backbone, min_word_count=1 if dataset in GENERATED_DATASETS else 5)
    budget = chosen.pretrained if backbone == "pretrained" else None
    cross = CrossAttentionConfig(encoder=encoder)
    if video is not None and video.twin_negatives:
        cross = dataclasses.replace(cross, twin_negatives=True, negative_weight=video.look_alike_weight)
    if backbone == "pretrained":
        cross = dataclasses.replace(cross, **PRETRAINED_SLOW)
    rerank = budget.rerank if budget else chosen.rerank
    if video is not None:
        rerank = dataclasses.replace(rerank, compiled_queries=rerank.compiled_queries and video.compiled_queries)
    return StudyConfig(
        profile=chosen.name,
        data=data,
        dual=DualEncoderConfig(encoder=encoder),
        train_dual=sizes.train_dual,
        distill=sizes.distill,
        cross=cross,
        train_cross=budget.train_cross if budget else sizes.train_cross,
        cross_ablation=budget.cross_ablation if budget else chosen.cross_ablation,
        rerank=rerank,
        headline_captions_per_image=(budget or chosen).headline_captions_per_image,
        slow_members=budget.slow_members if budget else 1,
        seed=seed,
        device=device or default_device(),
    )


# --- hashing: what keys the cache and names a result's config ---------------------------------


def to_jsonable(config: Any) -> Any:
    if dataclasses.is_dataclass(config):
        return {
            f.name: to_jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)
            if not (f.metadata.get(KEYED_WHEN_SET) and getattr(config, f.name) == f.default)
        }
    if isinstance(config, dict):
        return {str(k): to_jsonable(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_jsonable(v) for v in config]
    return config


def config_hash(config: Any) -> str:
    text = json.dumps(to_jsonable(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- a parameter as typed on a command line (run_all.sh -p, python -m fastslow.stages -p) -------


class ParameterError(ValueError):
    """Parameters a run cannot start with; the message says each problem and what is valid."""


# The valid values of the parameters that name one of a few things; a function, so the machine's
# devices are looked up only when a run asks for one.
PARAMETER_CHOICES: dict[str, Callable[[], Iterable[str]]] = {
    "profile": lambda: PROFILES,
    "dataset": lambda: DATASETS,
    "backbone": lambda: BACKBONES,
    "device": available_devices,
}


def typed_parameter(key: str, text: str, default: Any) -> Any:
    """``text`` as the value of parameter ``key`` whose default is ``default``: an int where the
    default is one; ``None`` as typed where the default is ``None``; otherwise a string, one of
    :data:`PARAMETER_CHOICES` for the parameters that have them. :class:`ParameterError` otherwise."""
    if isinstance(default, bool) or not isinstance(default, (int, str, type(None))):
        raise ParameterError(f"parameter {key!r} (default {default!r}) cannot be set from the command line")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ParameterError(f"parameter {key!r} is an integer, not {text!r}") from None
    if default is None and text == "None":
        return None
    if key in PARAMETER_CHOICES:
        choices = tuple(PARAMETER_CHOICES[key]())
        if text not in choices:
            what = "not available on this machine" if key == "device" else "unknown"
            raise ParameterError(f"{key} {text!r} is {what} (choose one of: {', '.join(choices)})")
    return text
