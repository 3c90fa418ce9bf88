"""Frozen pretrained features, computed once per (dataset, split, backbone, image size) and cached.

With ``backbone="pretrained"`` the image and text towers are frozen (:mod:`fastslow.models.pretrained`),
so their outputs are computed once and the Fast and Slow heads train on them cheaply:

* images: EfficientNet-Lite0 feature maps at strides 8/16/32 in float16 (for the cross-attention
  model's progressive upsampler) and the pooled 1280-d head features (for the dual encoder);
* captions: MiniLM-L6 token states in float16 with their attention mask and token ids (for the
  cross-attention model) and the L2-normalised sentence embeddings (for the dual encoder).

Extraction is resumable: it writes chunks atomically under the cache, and a rerun after an
interruption computes only the chunks that are missing. Under torchrun the ranks share the chunks
(each computes every N-th), and rank 0 writes the assembled entry
(``torchrun --nproc_per_node N -m fastslow.stages features ...``). The finished set is one cache entry
(:func:`fastslow.cache.load_or_build`; the chunks are then removed) keyed by :func:`feature_key`: the
backbones, the image size, the dataset, a digest of the split's image ids and captions and the
fingerprint of the files they were read from. A changed subset or a replaced photograph never reuses
stale features, and two splits with the same images (Flickr8k's val and test, both its dev list)
share one extraction.

Usage::

    feats = extract_features(cfg, "train")          # cfg: a StudyConfig, or FeatureParams
    feats.maps[-1]         # (N, 320, 7, 7) float16 at 224-pixel input
    feats.pooled           # (N, 1280) float32
    feats.caption_states   # (M, L, 384) float16, feats.caption_mask (M, L) bool
    feats.caption_pooled   # (M, 384) float32, unit norm
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastslow import distributed
from fastslow.cache import artifact_path, load_or_build, load_verified, save_verified
from fastslow.config import DataConfig, StudyConfig, default_device
from fastslow.data import CaptionedImages, files_key, load_dataset
from fastslow.inputs import EFFICIENTNET_LITE0, MAX_CAPTION_TOKENS, MINILM_L6
from fastslow.models.pretrained import image_backbone, text_backbone

# Items per chunk written to disk: what an interruption can lose (15-40 s of work on 2 cores).
IMAGES_PER_CHUNK = 256
CAPTIONS_PER_CHUNK = 2048
IMAGE_BATCH = 32
CAPTION_BATCH = 64


@dataclass(frozen=True)
class FeatureParams:
    """What the features are computed from: the data, the two backbones and the caption length."""

    data: DataConfig
    image_backbone: str = EFFICIENTNET_LITE0
    text_model: str = MINILM_L6
    max_caption_tokens: int = MAX_CAPTION_TOKENS

    @classmethod
    def from_config(cls, cfg: StudyConfig) -> FeatureParams:
        return cls(data=cfg.data)


@dataclass
class FeatureSet:
    """Frozen features of one split, aligned with its :class:`CaptionedImages`.

    ``maps[s]`` is ``(N, C_s, H/stride_s, W/stride_s)`` float16 for ``strides`` (fine to coarse),
    ``pooled`` ``(N, 1280)`` float32. ``caption_states`` ``(M, L, 384)`` float16, ``caption_mask``
    ``(M, L)`` bool (True at real tokens), ``caption_ids`` ``(M, L)`` int64 (the text model's
    vocabulary, 0 = padding), ``caption_pooled`` ``(M, 384)`` float32 with unit norm, and
    ``caption_image`` ``(M,)``: caption ``j`` describes image ``caption_image[j]``.
    ``extract_seconds``: compute time of the images and of the captions, summed over all chunks
    (also over the runs of an interrupted extraction).
    """

    maps: list[torch.Tensor]
    pooled: torch.Tensor
    caption_states: torch.Tensor
    caption_mask: torch.Tensor
    caption_ids: torch.Tensor
    caption_pooled: torch.Tensor
    caption_image: torch.Tensor
    image_ids: list[str]
    strides: tuple[int, ...]
    content_digest: str
    extract_seconds: dict[str, float]

    def __len__(self) -> int:
        return len(self.pooled)

    @property
    def nbytes(self) -> dict[str, int]:
        """Bytes held by the image features and by the caption features."""
        image = sum(m.nbytes for m in self.maps) + self.pooled.nbytes
        caption_tensors = (self.caption_states, self.caption_mask, self.caption_ids, self.caption_pooled)
        caption = sum(t.nbytes for t in caption_tensors)
        return {"images": image, "captions": caption}


def extract_features(
    source: StudyConfig | FeatureParams,
    split: str,
    data: CaptionedImages | None = None,
    device: str | None = None,
    images_per_chunk: int = IMAGES_PER_CHUNK,
    captions_per_chunk: int = CAPTIONS_PER_CHUNK,
) -> FeatureSet:
    """The cached features of ``split``, extracting (or resuming the extraction of) what is missing.

    ``data`` is the split they describe (default: ``load_dataset(params.data)[split]``). The device
    is not part of the cache key: it changes the features only by rounding.
    """
    params = source if isinstance(source, FeatureParams) else FeatureParams.from_config(source)
    device = device or (source.device if isinstance(source, StudyConfig) else default_device())
    data = data if data is not None else load_dataset(params.data)[split]
    key = feature_key(params, data)

    def build() -> dict:
        chunk_dir = artifact_path("features", key, ".chunks")
        artifact = _extract(params, data, key["content"], chunk_dir, device, images_per_chunk, captions_per_chunk)
        distributed.barrier()  # every rank has read every chunk
        if distributed.is_main():
            shutil.rmtree(chunk_dir, ignore_errors=True)
        return artifact

    return FeatureSet(**load_or_build("features", key, build))


def extraction_cost(source: StudyConfig | FeatureParams, device: str | None = None) -> dict[str, float]:
    """FLOPs of the frozen backbones for one image (at the data's image size) and for one caption
    (at the longest caption the features keep: an upper bound), counted by torch's FLOP counter on
    a batch of each, and this machine's seconds per item for the same batches."""
    from torch.utils.flop_counter import FlopCounterMode

    params = source if isinstance(source, FeatureParams) else FeatureParams.from_config(source)
    device = device or (source.device if isinstance(source, StudyConfig) else default_device())
    images = image_backbone(params.image_backbone, params.data.image_size).to(device)
    texts = text_backbone(params.text_model).to(device)
    size = params.data.image_size
    pixels = images.pixels(torch.zeros(IMAGE_BATCH, size, size, 3, dtype=torch.uint8).numpy(), device)
    captions = [" ".join(["word"] * params.max_caption_tokens)] * CAPTION_BATCH
    cost = {}
    for kind, run, items in (("image", lambda: images.features(pixels), IMAGE_BATCH),
                             ("caption", lambda: texts(captions, params.max_caption_tokens), CAPTION_BATCH)):
        with torch.inference_mode():
            with FlopCounterMode(display=False) as counter:
                run()
            started = time.perf_counter()
            run()
        cost[f"gflop_per_{kind}"] = counter.get_total_flops() / 1e9 / items
        cost[f"seconds_per_{kind}_here"] = (time.perf_counter() - started) / items
    return cost


def feature_key(params: FeatureParams, data: CaptionedImages) -> dict:
    """What the features of ``data`` depend on: the backbones, the image size, the split's image ids
    and captions (:func:`content_digest`) and the pixels, through the fingerprint of the files
    under ``data_dir`` (:func:`fastslow.data.files_key`)."""
    return {
        "dataset": params.data.dataset,
        "data_dir": _absolute(params.data.data_dir),
        "image_size": params.data.image_size,
        "image_backbone": params.image_backbone,
        "text_model": params.text_model,
        "max_caption_tokens": params.max_caption_tokens,
        "content": content_digest(data),
        **files_key(params.data.data_dir),
    }


def _absolute(data_dir: str | None) -> str | None:
    """A local ``data_dir`` as an absolute path, so ``../shared/x`` and ``/work/shared/x`` share features."""
    return str(Path(data_dir).resolve()) if data_dir and Path(data_dir).exists() else data_dir


def content_digest(data: CaptionedImages) -> str:
    """A hash of a split's image ids and captions: what its features must match."""
    content = json.dumps([data.image_ids, data.captions, data.caption_image.tolist()])
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def _extract(
    params: FeatureParams,
    data: CaptionedImages,
    digest: str,
    chunk_dir: Path,
    device: str,
    images_per_chunk: int,
    captions_per_chunk: int,
) -> dict:
    images = image_backbone(params.image_backbone, params.data.image_size).to(device)
    texts = text_backbone(params.text_model).to(device)
    where = f"{data.dataset}/{data.split}"

    @torch.inference_mode()
    def image_chunk(start: int, stop: int) -> dict[str, torch.Tensor]:
        return _image_features(images, data, start, stop, device)

    @torch.inference_mode()
    def caption_chunk(start: int, stop: int) -> dict[str, torch.Tensor]:
        return _caption_features(texts, data.captions[start:stop], params.max_caption_tokens)

    image_chunks = _run_chunks("image", chunk_dir, len(data), images_per_chunk, image_chunk, where)
    caption_chunks = _run_chunks("caption", chunk_dir, data.num_captions, captions_per_chunk, caption_chunk, where)
    n_maps = len(images.strides)
    return {
        "maps": [torch.cat([chunk[f"map{s}"] for chunk in image_chunks]) for s in range(n_maps)],
        "pooled": torch.cat([chunk["pooled"] for chunk in image_chunks]),
        **{
            name: _cat_padded([chunk[name] for chunk in caption_chunks])
            for name in ("caption_states", "caption_mask", "caption_ids")
        },
        "caption_pooled": torch.cat([chunk["caption_pooled"] for chunk in caption_chunks]),
        "caption_image": torch.as_tensor(data.caption_image),
        "image_ids": list(data.image_ids),
        "strides": tuple(images.strides),
        "content_digest": digest,
        "extract_seconds": {
            "images": sum(float(chunk["seconds"]) for chunk in image_chunks),
            "captions": sum(float(chunk["seconds"]) for chunk in caption_chunks),
        },
    }


def _image_features(backbone, data: CaptionedImages, start: int, stop: int, device: str) -> dict[str, torch.Tensor]:
    maps: list[list[torch.Tensor]] = [[] for _ in backbone.strides]
    pooled = []
    for batch_start in range(start, stop, IMAGE_BATCH):
        pixels = backbone.pixels(data.images[batch_start : min(batch_start + IMAGE_BATCH, stop)], device)
        batch_maps, batch_pooled = backbone.features(pixels)
        for scale, feature_map in enumerate(batch_maps):
            maps[scale].append(feature_map.half().cpu())
        pooled.append(batch_pooled.float().cpu())
    return {**{f"map{s}": torch.cat(m) for s, m in enumerate(maps)}, "pooled": torch.cat(pooled)}


def _caption_features(encoder, captions: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
    batches = [encoder(captions[i : i + CAPTION_BATCH], max_tokens) for i in range(0, len(captions), CAPTION_BATCH)]
    return {
        "caption_states": _cat_padded([batch.states.half().cpu() for batch in batches]),
        "caption_mask": _cat_padded([batch.mask.cpu() for batch in batches]),
        "caption_ids": _cat_padded([batch.ids.cpu() for batch in batches]),
        "caption_pooled": torch.cat([batch.pooled.float().cpu() for batch in batches]),
    }


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``(n_i, L_i, ...)`` tensors along the first axis, zero-padding ``L`` to the longest."""
    length = max(tensor.shape[1] for tensor in tensors)
    return torch.cat([F.pad(t, [0, 0] * (t.ndim - 2) + [0, length - t.shape[1]]) for t in tensors])


def _run_chunks(
    kind: str,
    chunk_dir: Path,
    total: int,
    per_chunk: int,
    compute: Callable[[int, int], dict[str, torch.Tensor]],
    where: str,
) -> list[dict[str, torch.Tensor]]:
    """Compute ``[start, stop)`` chunks of ``total`` items, each saved atomically; load those already saved
    (a chunk that fails its checksum is computed again). Under torchrun each rank computes every
    ``world_size``-th chunk, from its rank on, and all ranks then read all of them."""
    bounds = [(start, min(start + per_chunk, total)) for start in range(0, total, per_chunk)]
    paths = [chunk_dir / f"{kind}-{start:08d}-{stop:08d}.pt" for start, stop in bounds]
    mine = list(zip(bounds, paths))[distributed.rank() :: distributed.world_size()]
    chunks = {}
    with tqdm(total=sum(stop - start for (start, stop), _ in mine), desc=f"{kind} features {where}", unit=kind) as progress:
        for (start, stop), path in mine:
            chunk = load_verified(path)
            if chunk is None:
                started = time.perf_counter()
                chunk = compute(start, stop)
                chunk["seconds"] = torch.tensor(time.perf_counter() - started)
                save_verified(chunk, path)
            chunks[path] = chunk
            progress.update(stop - start)
    distributed.barrier()
    return [chunks[path] if path in chunks else _written_by_another_rank(path) for path in paths]


def _written_by_another_rank(path: Path) -> dict[str, torch.Tensor]:
    chunk = load_verified(path)
    if chunk is None:
        raise RuntimeError(f"feature chunk {path} is missing or damaged after every rank finished its share")
    return chunk
