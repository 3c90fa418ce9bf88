"""The Slow model: caption tokens cross-attend to a fine grid of visual tokens.

image -> :class:`~fastslow.models.encoders.ConvTower` maps (strides 4, 8, 16: 12x12, 6x6, 3x3 for
48 px images) -> :class:`ProgressiveUpsampler` (the coarse map, upsampled x2 per step and fused with
the tower's map at that scale, as in a feature pyramid) -> visual tokens (the final map flattened,
plus 2-D positions, projected to the decoder width) -> caption decoders (causal self-attention over
the caption, cross-attention to the visual tokens).

A clip of T frames goes through the same tower and upsampler frame by frame (time folded into the
batch); each frame's grid cells get the same 2-D positions plus a learned embedding of the frame's
time, and the clip's visual tokens are all T x h x w of them: caption words attend over space and
time at once, and everything after the visual tokens is the same code for images and clips.

Words: on the generated data the decoders learn their words from scratch. On real photographs a
few thousand captions are too few to learn English from, so the decoders stand on MiniLM's word
pieces instead (:class:`~fastslow.data.text.WordPieceVocabulary`: the pieces that occur in the
training captions): each decoder starts its own copy of their input embeddings from MiniLM's and
reads it at both ends, to embed a token and to predict the next one (:class:`TiedWordPieces`).

The score of a pair, higher = better match, depends on the training objective:

* ``bidirectional``: mean per-token log-probability of the caption under the forward
  (left-to-right) decoder plus the same under the backward (right-to-left) decoder. Each mean is
  taken over the tokens a decoder predicts: the caption's n words and the closing EOS, n + 1 in all.
  Length normalisation keeps long captions from being penalised for being long; the two directions
  see every word with the other side's context, so a word that only the words after it explain
  (a colour named before its shape) still counts.
* ``forward``: the forward term only.
* ``itm``: the logit of a binary image-text matching head on the forward decoder's state at the
  caption's EOS token: under the causal mask that state has seen the whole caption, so it plays
  the role of a [CLS] token.

Query time (:func:`visual_tokens`, :func:`pair_scores`): the gallery's visual tokens and each
layer's cross-attention keys and values are computed once per gallery, and the image-independent
part of each caption (embedding and the first layer's causal self-attention) once, however many
images the caption meets.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastslow.config import OBJECTIVES, CrossAttentionConfig
from fastslow.inputs import (
    MAX_CAPTION_TOKENS,
    PAD_ID,
    FeatureImages,
    frames_per_item,
    is_clips,
    model_input,
    real_tokens,
    trim_padding,
)
from fastslow.models.encoders import build_image_tower

KeysValues = list[tuple[torch.Tensor, torch.Tensor]]  # one (keys, values) per decoder layer
POSITION_INIT_STD = 0.1


def map_side(image_size: int, stride: int) -> int:
    """Side of a feature map after ``log2(stride)`` convolutions of stride 2 (kernel 3, padding 1)."""
    side = image_size
    for _ in range(int(math.log2(stride))):
        side = (side + 1) // 2
    return side


class ProgressiveUpsampler(nn.Module):
    """Start from the tower's coarsest map; each step doubles the resolution and fuses the tower's
    map at that scale (lateral 1x1 convolution, add, 3x3 convolution), as in a feature pyramid.

    The coarse map holds the most semantic features but blurs small objects together; each step
    brings back the spatial detail of a finer map, so caption words can attend to a finer grid.
    ``in_channels`` are the tower's channels, fine to coarse; 0 steps returns the coarse map only.
    """

    def __init__(self, in_channels: tuple[int, ...], width: int, steps: int):
        super().__init__()
        if not 0 <= steps < len(in_channels):
            raise ValueError(f"upsample_steps must lie in [0, {len(in_channels) - 1}], got {steps}")
        self.coarse_lateral = nn.Conv2d(in_channels[-1], width, 1)
        finer = [in_channels[-2 - i] for i in range(steps)]
        self.laterals = nn.ModuleList(nn.Conv2d(c, width, 1) for c in finer)
        self.smooths = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GELU()) for _ in range(steps)
        )

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """``maps`` fine to coarse, as the tower returns them; returns ``(B, width, h, w)``."""
        x = self.coarse_lateral(maps[-1])
        for i, (lateral, smooth) in enumerate(zip(self.laterals, self.smooths)):
            finer = maps[-2 - i]
            x = F.interpolate(x, size=finer.shape[-2:], mode="nearest") + lateral(finer)
            x = smooth(x)
        return x


class _GatherRows(torch.autograd.Function):
    """``source.index_select(0, index)`` whose backward adds the gradient back row by row into a
    contiguous buffer. The stock backward scatters through an index expanded to the gradient's
    shape, which on a CPU is ~6x slower when the gradient arrives head-split and non-contiguous
    (as SDPA's key and value gradients do): a third of a matching model's training step."""

    @staticmethod
    def forward(ctx, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.source_shape = source.shape
        return source.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        source_grad = grad.new_zeros(ctx.source_shape)
        source_grad.view(len(source_grad), -1).index_add_(0, index, grad.reshape(len(grad), -1))
        return source_grad, None


def gather_keys_values(keys_values: KeysValues, images: torch.Tensor) -> KeysValues:
    """Each layer's keys and values of the images ``images`` (rows of ``keys_values``, repeated
    as often as they appear): the per-pair view a training step attends to."""
    return [(_GatherRows.apply(keys, images), _GatherRows.apply(values, images)) for keys, values in keys_values]


def _cross_attend(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, need_weights: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of ``(1 or G, heads, M, d)`` queries to ``(G, heads, T, d)`` keys and values, and
    the ``(G, heads, M, T)`` weights when ``need_weights`` (else None).

    Without weights, the fused kernel on the query broadcast to the G images: the weights of every
    pair are the bulk of a Slow model's memory traffic, and the fused kernel never stores them
    (half the time of the written-out form at 45 images x 720 query tokens x 197 visual tokens).
    """
    if not need_weights:
        expanded = query.expand(len(keys), *query.shape[1:])
        return F.scaled_dot_product_attention(expanded, keys, values), None
    weights = (query @ keys.transpose(-2, -1) * query.shape[-1] ** -0.5).softmax(-1)
    return weights @ values, weights


class DecoderLayer(nn.Module):
    """Pre-norm transformer decoder layer: causal self-attention over the caption, cross-attention
    to the visual tokens, feed-forward.

    Split into a caption-only part (:meth:`self_attention`) and an image-dependent part
    (:meth:`attend_image`), so a caption scored against many images runs the first part once.
    Image-dependent states are laid out ``(G, n, L, W)``: G images, each paired with n captions of
    L tokens (training: n = 1; one caption against a block of images: the caption states are
    ``(1, n, L, W)`` and broadcast over the images).
    """

    def __init__(self, width: int, heads: int, ffn_ratio: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.self_norm = nn.LayerNorm(width)
        self.self_qkv = nn.Linear(width, 3 * width)
        self.self_out = nn.Linear(width, width)
        self.cross_norm = nn.LayerNorm(width)
        self.cross_query = nn.Linear(width, width)
        self.cross_key_value = nn.Linear(width, 2 * width)
        self.cross_out = nn.Linear(width, width)
        self.ffn_norm = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, ffn_ratio * width), nn.GELU(), nn.Linear(ffn_ratio * width, width))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, M, W)`` to ``(B, heads, M, W / heads)``."""
        batch, length, width = x.shape
        return x.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

    @staticmethod
    def _merge(x: torch.Tensor) -> torch.Tensor:
        batch, heads, length, head_width = x.shape
        return x.transpose(1, 2).reshape(batch, length, heads * head_width)

    def self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Causal self-attention over ``(..., L, W)`` caption states: each token sees itself and the
        tokens before it (padding comes after every real token, so the causal mask keeps it out)."""
        flat = x.reshape(-1, *x.shape[-2:])
        query, keys, values = (self._split(t) for t in self.self_qkv(self.self_norm(flat)).chunk(3, dim=-1))
        attended = F.scaled_dot_product_attention(query, keys, values, is_causal=True)
        return x + self.self_out(self._merge(attended)).view(x.shape)

    def visual_keys_values(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T, W)`` visual tokens to this layer's ``(B, heads, T, W / heads)`` keys and values."""
        keys, values = self.cross_key_value(visual).chunk(2, dim=-1)
        return self._split(keys), self._split(values)

    def attend_image(
        self, x: torch.Tensor, keys_values: tuple[torch.Tensor, torch.Tensor], need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cross-attention of ``(1 or G, n, L, W)`` caption states to G images' keys and values,
        then the feed-forward block. Returns ``(G, n, L, W)`` states and, if ``need_weights``,
        the ``(G, heads, n * L, T)`` attention weights (else None)."""
        groups, captions, length, width = x.shape
        query = self._split(self.cross_query(self.cross_norm(x)).view(groups, captions * length, width))
        attended, weights = _cross_attend(query, *keys_values, need_weights)
        x = x + self.cross_out(self._merge(attended)).view(len(attended), captions, length, width)
        return x + self.ffn(self.ffn_norm(x)), weights


class TiedWordPieces(nn.Module):
    """A caption decoder's own trainable copy of a pretrained ``(V, D)`` word-piece table, read at
    both ends (the output layer tied to the input table, as in BERT and GPT-2): a token enters as
    ``Linear(D -> width)(table[id])``, and the next token's logits are
    ``Linear(width -> D)(h) @ table.T + bias``.

    The logits are computed as ``h @ (table @ W_out).T + bias`` (the same product, associated the
    other way): a token then costs V x width multiply-adds instead of V x D (D = 384 against a
    width of 64). Scoring (evaluation mode without gradients) computes ``table @ W_out`` once and
    reuses it until the weights change; training recomputes it every call, so the gradient reaches
    the table through both ends.
    """

    def __init__(self, word_table: torch.Tensor, width: int):
        super().__init__()
        vocab_size, table_width = word_table.shape
        self.table = nn.Parameter(word_table.detach().clone().float())
        self.input_projection = nn.Linear(table_width, width)
        # No bias: the per-piece bias covers what it would add (table @ its bias, one per piece).
        self.output_projection = nn.Linear(width, table_width, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self._scoring_weight: tuple[tuple, torch.Tensor] | None = None  # (weights' stamp, product)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``(..., L)`` ids to ``(..., L, width)`` token embeddings."""
        return self.input_projection(self.table[ids])

    def output_weight(self) -> torch.Tensor:
        """``(V, width)`` ``table @ W_out``, the weight of the logits' linear map."""
        weight = self.output_projection.weight
        if self.training or torch.is_grad_enabled():
            return self.table @ weight
        stamp = (self.table.data_ptr(), self.table._version, weight.data_ptr(), weight._version)
        if self._scoring_weight is None or self._scoring_weight[0] != stamp:
            self._scoring_weight = (stamp, self.table @ weight)
        return self._scoring_weight[1]

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """``(..., width)`` decoder states to ``(..., V)`` next-token logits."""
        return F.linear(states, self.output_weight(), self.bias)


class CaptionDecoder(nn.Module):
    """Token and position embeddings, decoder layers, and a next-token head.

    With a ``word_table`` (``(V, D)`` rows of a pretrained text model's word-embedding table, one
    per vocabulary id) the tokens are embedded and predicted through the decoder's own copy of it
    (:class:`TiedWordPieces`, its ``head``); without one, a token embedding learned from scratch
    and a linear head.
    """

    def __init__(
        self, vocab_size: int, config: CrossAttentionConfig, word_table: torch.Tensor | None = None
    ):
        super().__init__()
        width = config.width
        # MiniLM's word pieces come as the features cached them (up to MAX_CAPTION_TOKENS).
        length = config.encoder.max_caption_tokens if word_table is None else MAX_CAPTION_TOKENS
        self.position_embedding = nn.Parameter(torch.zeros(length, width))
        if word_table is None:
            # Tokens and positions start at the same small scale (as in GPT-2), so word order
            # counts from the first step (torch's default N(0, 1) tokens would dwarf the positions).
            self.token_embedding = nn.Embedding(vocab_size, width, padding_idx=PAD_ID)
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            with torch.no_grad():
                self.token_embedding.weight[PAD_ID].zero_()
        # Projected MiniLM word pieces start at about 0.03: the same scale.
        nn.init.normal_(self.position_embedding, std=0.02)
        self.layers = nn.ModuleList(DecoderLayer(width, config.heads, config.ffn_ratio) for _ in range(config.layers))
        self.norm = nn.LayerNorm(width)
        if word_table is None:
            self.head = nn.Linear(width, vocab_size)
        else:
            self.head = TiedWordPieces(word_table, width)

    def visual_keys_values(self, visual: torch.Tensor) -> KeysValues:
        return [layer.visual_keys_values(visual) for layer in self.layers]

    def caption_states(self, inputs: torch.Tensor) -> torch.Tensor:
        """The image-independent start, ``(B, L)`` ids to ``(B, L, W)``: embeddings and the first
        layer's self-attention."""
        if isinstance(self.head, TiedWordPieces):
            tokens = self.head.embed(inputs)
        else:
            tokens = self.token_embedding(inputs)
        return self.layers[0].self_attention(tokens + self.position_embedding[: inputs.shape[1]])

    def decode(
        self, states: torch.Tensor, keys_values: KeysValues, need_weights: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The image-dependent rest, from ``(1 or G, n, L, W)`` :meth:`caption_states`; returns the
        final (normalised) ``(G, n, L, W)`` states and each layer's cross-attention weights (None
        unless ``need_weights``)."""
        x, weights = self.layers[0].attend_image(states, keys_values[0], need_weights)
        all_weights = [weights]
        for layer, layer_keys_values in zip(self.layers[1:], keys_values[1:]):
            x, weights = layer.attend_image(layer.self_attention(x), layer_keys_values, need_weights)
            all_weights.append(weights)
        return self.norm(x), all_weights


def reverse_captions(tokens: torch.Tensor) -> torch.Tensor:
    """``[BOS, w1..wn, EOS, PAD..]`` to ``[BOS, wn..w1, EOS, PAD..]``, row by row: what the backward
    decoder reads."""
    lengths = tokens.ne(PAD_ID).sum(1, keepdim=True)
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    is_word = (positions >= 1) & (positions <= lengths - 2)
    return tokens.gather(1, torch.where(is_word, lengths - 1 - positions, positions))


def teacher_forcing(tokens: torch.Tensor, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A direction's (``left_to_right`` or ``right_to_left``) decoder inputs and next-token
    targets (padding targets are ``PAD_ID``)."""
    ordered = tokens if direction == "left_to_right" else reverse_captions(tokens)
    return ordered[:, :-1], ordered[:, 1:]


def mean_token_log_prob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per caption: the mean log-probability of its target tokens (padding excluded)."""
    log_probs = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    real = targets.ne(PAD_ID)
    return (log_probs * real).sum(-1) / real.sum(-1).clamp(min=1)


class CrossAttentionModel(nn.Module):
    """Image tower, progressive upsampler, visual tokens, and one caption decoder per reading
    direction (two for ``bidirectional``, the forward one otherwise), plus a match head for ``itm``."""

    def __init__(
        self,
        vocab_size: int,
        config: CrossAttentionConfig,
        image_size: int,
        frames: int = 1,
        word_table: torch.Tensor | None = None,
    ):
        """``frames``: frames per clip the time embedding is built for (1 for images: none).
        ``word_table``: ``(vocab_size, D)`` pretrained word-piece rows the decoders start from
        (:class:`TiedWordPieces`; :func:`fastslow.models.pretrained.minilm_word_table`), or None
        for decoders that learn their words from scratch."""
        super().__init__()
        if word_table is not None and (word_table.ndim != 2 or len(word_table) != vocab_size):
            raise ValueError(f"word_table must be ({vocab_size}, D), got {tuple(word_table.shape)}")
        if config.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {config.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        self.objective = config.objective
        # What the captions are, as :class:`fastslow.stages.Study` provides them to a Slow model.
        self.reads = "words" if word_table is None else "word_pieces"
        self.image_tower = build_image_tower(config.encoder)
        self.train_tower = config.train_tower
        self.image_tower.requires_grad_(config.train_tower)
        self.upsampler = ProgressiveUpsampler(self.image_tower.out_channels, config.width, config.upsample_steps)
        side = map_side(image_size, self.image_tower.strides[-1 - config.upsample_steps])
        self.grid_shape = (side, side)
        # Positions at about the scale of the grid's features (0.1-0.4 at initialisation), so where
        # things are is visible from the first step.
        self.row_embedding = nn.Parameter(torch.zeros(side, config.width))
        self.column_embedding = nn.Parameter(torch.zeros(side, config.width))
        nn.init.normal_(self.row_embedding, std=POSITION_INIT_STD)
        nn.init.normal_(self.column_embedding, std=POSITION_INIT_STD)
        self.visual_projection = nn.Linear(config.width, config.width)
        self.visual_norm = nn.LayerNorm(config.width)
        self.directions = ("left_to_right", "right_to_left") if config.objective == "bidirectional" else ("left_to_right",)
        self.decoders = nn.ModuleDict(
            {d: CaptionDecoder(vocab_size, config, word_table) for d in self.directions}
        )
        self.match_head = nn.Linear(config.width, 1) if config.objective == "itm" else None
        # Built last and only for clips, so an image model's weights draw the same random numbers as
        # before clips existed. At the scale of the 2-D positions, for the same reason as theirs.
        self.time_embedding = nn.Parameter(torch.zeros(frames, config.width)) if frames > 1 else None
        if self.time_embedding is not None:
            nn.init.normal_(self.time_embedding, std=POSITION_INIT_STD)

    def train(self, mode: bool = True) -> CrossAttentionModel:
        """A frozen tower stays in evaluation mode: its batch-norm statistics are part of it."""
        super().train(mode)
        if not self.train_tower:
            self.image_tower.eval()
        return self

    def encode_images(self, images: torch.Tensor | FeatureImages) -> torch.Tensor:
        """Normalised ``(B, 3, H, W)`` images (or their frozen features) to ``(B, h * w, W)`` visual
        tokens (the grid cells), or ``(B, T, 3, H, W)`` clips to ``(B, T * h * w, W)``
        spatio-temporal ones (frame by frame: every cell of the first frame, then of the second, ...).

        Frozen features are the maps of a frozen tower, computed once: EfficientNet-Lite0's, or
        this model's own ``tiny`` tower's (:func:`fastslow.models.encoders.frozen_tower_maps`)."""
        positions = (self.row_embedding[:, None, :] + self.column_embedding[None, :, :]).flatten(0, 1)
        clips, frames = is_clips(images), frames_per_item(images)
        if clips and (self.time_embedding is None or frames > len(self.time_embedding)):
            built = 0 if self.time_embedding is None else len(self.time_embedding)
            raise ValueError(f"clips of {frames} frames; the model was built for {built} (frames=... at construction)")
        grid = self.upsampler(self._frame_maps(images))
        if clips:
            cells = grid.flatten(2).transpose(1, 2).unflatten(0, (len(images), frames))  # (B, T, h * w, W)
            tokens = (cells + positions + self.time_embedding[:frames, None, :]).flatten(1, 2)
        else:
            tokens = grid.flatten(2).transpose(1, 2) + positions
        return self.visual_norm(self.visual_projection(tokens))

    def _frame_maps(self, images: torch.Tensor | FeatureImages) -> list[torch.Tensor]:
        """The tower's maps of each image, or of each frame of a clip (time folded into the batch)."""
        if isinstance(images, FeatureImages):
            if self.train_tower:
                raise ValueError("frozen features skip the image tower, which this model fine-tunes")
            return images.frame_maps()
        return self.image_tower(images.flatten(0, 1) if images.ndim == 5 else images)

    def visual_keys_values(self, visual: torch.Tensor) -> dict[str, KeysValues]:
        return {d: decoder.visual_keys_values(visual) for d, decoder in self.decoders.items()}

    def decoder_states(
        self,
        direction: str,
        inputs: torch.Tensor,
        keys_values: KeysValues,
        images: torch.Tensor | None = None,
        captions: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """One decoder's final ``(G, n, L, W)`` states (and cross-attention weights, if
        ``need_weights``) for caption
        rows ``captions[g]`` of ``inputs`` paired with image ``images[g]`` of ``keys_values``.

        ``captions`` is ``(G, n)``, or ``(1, n)`` for the same n captions against every image.
        Without indices, caption ``i`` goes with image ``i`` (a training batch of matched pairs).
        The caption-only part runs once per caption, however many images it meets.
        """
        decoder = self.decoders[direction]
        states = decoder.caption_states(inputs)
        states = states[:, None] if captions is None else states[captions]
        if images is not None:
            keys_values = gather_keys_values(keys_values, images)
        return decoder.decode(states, keys_values, need_weights)

    def score_pairs(
        self,
        tokens: torch.Tensor,
        keys_values: dict[str, KeysValues],
        images: torch.Tensor,
        captions: torch.Tensor,
    ) -> torch.Tensor:
        """``(G, n)`` scores (see the module docstring) of caption rows ``captions[g]`` of ``tokens``
        (``[BOS, words, EOS, PAD..]``) against image ``images[g]`` of ``keys_values``
        (:meth:`visual_keys_values` of the images); ``captions`` may be ``(1, n)`` (every image
        against the same captions)."""
        shape = (len(images), captions.shape[1])
        if self.objective == "itm":
            states, _ = self.decoder_states("left_to_right", tokens, keys_values["left_to_right"], images, captions)
            eos = (tokens.ne(PAD_ID).sum(1) - 1)[captions].expand(shape)
            at_eos = states.gather(2, eos[..., None, None].expand(*shape, 1, states.shape[-1])).squeeze(2)
            return self.match_head(at_eos).squeeze(-1)
        total = torch.zeros(shape, device=tokens.device)
        for direction in self.directions:
            inputs, targets = teacher_forcing(tokens, direction)
            states, _ = self.decoder_states(direction, inputs, keys_values[direction], images, captions)
            logits = self.decoders[direction].head(states)
            total = total + mean_token_log_prob(logits, targets[captions].expand(*shape, -1))
        return total


@torch.no_grad()
def visual_tokens(
    model: CrossAttentionModel, images: np.ndarray | FeatureImages, device: str = "cpu", batch_size: int = 256
) -> torch.Tensor:
    """``(N, tokens, W)`` visual tokens of uint8 ``(N, H, W, 3)`` images (or their frozen features)
    or ``(N, T, H, W, 3)`` clips (computed in batches of about ``batch_size`` frames), left on
    ``device``: computed once per gallery, then indexed by :func:`pair_scores` for every query."""
    model.eval()
    batch_size = max(1, batch_size // frames_per_item(images))
    chunks = [
        model.encode_images(model_input(images[i : i + batch_size], device))
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


# id(gallery tensor) -> (stamp, keys and values); an entry goes when its tensor is freed.
_GALLERY_KEYS_VALUES: dict[int, tuple[tuple, dict[str, KeysValues]]] = {}
# model -> the weights that project its keys and values (loading weights copies into them in place).
_KEY_VALUE_PROJECTIONS: weakref.WeakKeyDictionary[nn.Module, tuple[nn.Parameter, ...]] = weakref.WeakKeyDictionary()


def gallery_keys_values(model: CrossAttentionModel, gallery_tokens: torch.Tensor) -> dict[str, KeysValues]:
    """Every gallery image's cross-attention keys and values, projected once and kept as long as the
    gallery tensor lives: one caption against the whole gallery (Slow-only search) then costs the
    decoder passes alone, as it would in a deployment that stores them beside the visual tokens.

    Recomputed when the gallery tensor or the weights that project keys and values changed in
    place since (only those: stamping every weight cost 0.1 ms a call, a tenth of a query's).
    Stored contiguous, so gathering a query's K candidates copies whole rows: gathering them from
    the head-split views took a quarter of a Fast+Slow query's scoring (the scores are the same).
    """
    key = id(gallery_tokens)
    projections = _KEY_VALUE_PROJECTIONS.get(model)
    if projections is None:  # walking every module took half of a one-caption call's overhead
        layers = (m for m in model.modules() if isinstance(m, DecoderLayer))
        projections = _KEY_VALUE_PROJECTIONS[model] = tuple(p for layer in layers for p in layer.cross_key_value.parameters())
    # An inference tensor keeps no version counter (an in-place edit of one goes unseen).
    version = 0 if gallery_tokens.is_inference() else gallery_tokens._version
    stamp = (id(model), version, tuple(p._version for p in projections))
    cached = _GALLERY_KEYS_VALUES.get(key)
    if cached is None or cached[0] != stamp:
        if cached is None:
            weakref.finalize(gallery_tokens, _GALLERY_KEYS_VALUES.pop, key, None)
        cached = (stamp, _contiguous(model.visual_keys_values(gallery_tokens)))
        _GALLERY_KEYS_VALUES[key] = cached
    return cached[1]


def _contiguous(tree):
    """Every tensor of nested dicts, lists and tuples laid out contiguously."""
    if isinstance(tree, torch.Tensor):
        return tree.contiguous()
    if isinstance(tree, dict):
        return {key: _contiguous(value) for key, value in tree.items()}
    return type(tree)(_contiguous(value) for value in tree)


@torch.no_grad()
def pair_scores(
    model: CrossAttentionModel,
    gallery_tokens: torch.Tensor,
    caption_tokens: torch.Tensor,
    candidates: torch.Tensor,
    batch_pairs: int = 2048,
    score_block: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """``(Q, K)`` Slow scores: caption ``q`` against gallery image ``candidates[q, k]``.

    ``gallery_tokens`` are :func:`visual_tokens` of the gallery (indexed, never recomputed);
    ``caption_tokens`` ``(Q, L)`` token ids. Scoring the whole gallery:
    ``candidates = torch.arange(N).expand(Q, N)``. Returned on the CPU.

    Cost: the cross-attention keys and values of the gallery are projected once and kept with it
    (:func:`gallery_keys_values`), so a call pays for the caption side alone, as a deployment that
    stores them beside the visual tokens would (projecting K = 20 candidates' keys and values per
    query added 60% to each pair's cost on shapes); each caption's image-independent part runs
    once per block of ``batch_pairs`` pairs. Blocks hold captions
    of similar length (less padding); where a block's captions share their candidates (the whole
    gallery, a batch against itself) every caption meets each image's keys and values without
    copying them per pair. ``score_block`` scores each block (:meth:`CrossAttentionModel.score_pairs`
    by default; the timed query path passes a compiled copy of it, :class:`fastslow.bench.QueryPath`).
    """
    score_block = score_block or model.score_pairs
    if model.training:  # eval() walks every module: 0.25 ms, a quarter of a one-caption call
        model.eval()
    device = gallery_tokens.device
    candidates = torch.as_tensor(candidates, device=device)
    n_queries, n_candidates = candidates.shape
    keys_values = gallery_keys_values(model, gallery_tokens)
    caption_tokens = caption_tokens.to(device)
    if n_queries == 1 and n_candidates <= batch_pairs:  # one typed query: a single block, as below
        only_caption = torch.zeros((1, 1), dtype=torch.long, device=device)
        return score_block(trim_padding(caption_tokens), keys_values, candidates[0], only_caption).T.float().cpu()
    order = torch.argsort(real_tokens(caption_tokens).sum(1), stable=True)
    scores = torch.empty(n_queries, n_candidates)
    # Blocks about square (each image's keys and values serve many captions), wider for few queries.
    queries_per_batch = min(n_queries, max(1, math.isqrt(batch_pairs), batch_pairs // n_candidates))
    columns_per_batch = min(n_candidates, max(1, batch_pairs // queries_per_batch))
    for start in range(0, n_queries, queries_per_batch):
        rows = order[start : start + queries_per_batch]
        tokens = trim_padding(caption_tokens[rows])
        captions = torch.arange(len(rows), device=device)
        for column in range(0, n_candidates, columns_per_batch):
            slots = candidates[rows, column : column + columns_per_batch]
            if bool((slots == slots[:1]).all()):  # shared candidates: (images, captions) block
                block = score_block(tokens, keys_values, slots[0], captions[None]).T
            else:  # one pair per group
                pairs = score_block(tokens, keys_values, slots.flatten(), captions.repeat_interleave(slots.shape[1])[:, None])
                block = pairs.view(slots.shape)
            scores[rows.cpu(), column : column + columns_per_batch] = block.float().cpu()
    return scores


@torch.no_grad()
def cross_attention_maps(model: CrossAttentionModel, image: np.ndarray | FeatureImages, tokens: torch.Tensor) -> torch.Tensor:
    """Where the forward decoder looks while predicting each token of one caption.

    ``image``: a batch of one image, ``images[i : i + 1]`` of uint8 pixels or of frozen features;
    ``tokens`` ``(L,)`` ids; returns ``(layers, predicted tokens, h, w)``
    cross-attention weights averaged over heads, row ``t`` being the map used to predict token
    ``t + 1`` (the word after BOS first, EOS last). A batch of one clip, ``(1, T, H, W, 3)``, gives
    ``(layers, predicted tokens, T, h, w)``.
    """
    model.eval()
    device = next(model.parameters()).device
    tokens = trim_padding(tokens.view(1, -1)).to(device)
    visual = model.encode_images(model_input(image, device))
    inputs, _ = teacher_forcing(tokens, "left_to_right")
    keys_values = model.visual_keys_values(visual)["left_to_right"]
    _, weights = model.decoder_states("left_to_right", inputs, keys_values, need_weights=True)
    maps = torch.stack([w[0].mean(0) for w in weights])  # (layers, L, T)
    frames = (frames_per_item(image),) if frames_per_item(image) > 1 else ()
    return maps.view(*maps.shape[:2], *frames, *model.grid_shape).cpu()


def itm_negatives(image_index: torch.Tensor, twin: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(B, 2)`` batch positions whose captions serve as each pair's two ITM negatives.

    Column 0, the hard one: the image's twin (same objects, colours or positions swapped: the
    hardest negative there is) when the twin is in the batch, otherwise a random other pair. Column
    1, a random other pair of the batch: with twin negatives alone the head would have to learn
    binding before it could learn anything, and it learns slowly.
    """
    batch = len(image_index)

    def random_other() -> torch.Tensor:
        return (torch.arange(batch) + torch.randint(1, max(2, batch), (batch,), generator=generator)) % batch

    position = {int(image): p for p, image in enumerate(image_index.tolist())}
    twin_position = torch.tensor([position.get(int(twin[int(image)]), -1) for image in image_index.tolist()])
    hard = torch.where(twin_position >= 0, twin_position, random_other())
    return torch.stack([hard, random_other()], 1).to(image_index.device)


def keep_twins_together(order: np.ndarray, twin: np.ndarray) -> np.ndarray:
    """Reorder a shuffled epoch so each image is followed by its twin (at its first appearance):
    consecutive batches then hold both images of almost every twin pair (a pair is split only when
    it straddles a batch boundary), which :func:`itm_negatives` needs."""
    placed = np.zeros(len(twin), dtype=bool)
    grouped = []
    for image in order:
        if placed[image]:
            continue
        grouped.append(image)
        placed[image] = True
        if twin[image] >= 0 and not placed[twin[image]]:
            grouped.append(twin[image])
            placed[twin[image]] = True
    return np.asarray(grouped, dtype=order.dtype)
