"""The matching Slow model for real photographs: an image-text matching (ITM) cross-encoder.

ALBEF and BLIP re-rank with a cross-encoder that reads a caption's contextual token states (from
a pretrained language model), lets them attend to the image's grid of visual tokens, and turns the
fused [CLS] state into one matching logit, trained to tell an image's caption from hard look-alikes.
This model does the same on the study's frozen features:

* text: MiniLM-L6's token states (cached with the features; no word is predicted, so nothing of
  the caption can leak into its own score), projected to the model's width;
* image: the same :class:`~fastslow.models.cross_attention.ProgressiveUpsampler` over
  EfficientNet-Lite0's maps as the captioning model, plus 2-D positions, and the backbone's pooled
  features as one more token (the whole scene at a glance);
* ``layers`` blocks of self-attention over the caption (padding masked, both directions: a matching
  model reads the whole caption at once), cross-attention to the visual tokens and a feed-forward;
  the last block runs for the [CLS] token only, the one the match head reads;
* a global term, as ALBEF and BLIP add their contrastive similarity to the match score when they
  re-rank: a dual encoder's two heads (on the pooled image features and on the caption's sentence
  embedding), their cosine times a learned scale. Trained with the rest, or copied from the
  trained Fast model and frozen (:meth:`MatchingModel.load_fast_heads`), so that the
  cross-attention learns a correction to the Fast model's similarity.

Cost per pair: the first block's self-attention sees the caption alone, so it runs once per caption;
each image's cross-attention keys and values are projected once per image; what runs per pair is
the first block's cross-attention and feed-forward for the caption's L tokens, then the last
block's for one token. The score of a pair is the match logit plus the global term (higher =
better match).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastslow.config import CrossAttentionConfig, DualEncoderConfig
from fastslow.inputs import FeatureImages, real_tokens
from fastslow.models.cross_attention import (
    POSITION_INIT_STD,
    DecoderLayer,
    KeysValues,
    gather_keys_values,
    ProgressiveUpsampler,
    map_side,
)
from fastslow.models.encoders import build_image_tower


class MatchingLayer(DecoderLayer):
    """A :class:`DecoderLayer` whose self-attention reads the whole caption (padding masked)
    instead of the words before each one."""

    def self_attention(self, x: torch.Tensor, padding: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """``(..., L, W)`` caption states with ``(..., L)`` padding (True at padding) to the same
        states after self-attention; ``first_only``: only the first token's ([CLS]) row,
        ``(..., 1, W)``."""
        flat = x.reshape(-1, *x.shape[-2:])
        query, keys, values = (
            self._split(t) for t in self.self_qkv(self.self_norm(flat)).chunk(3, dim=-1)
        )
        residual = flat
        if first_only:
            query, residual = query[:, :, :1], flat[:, :1]
        mask = ~padding.reshape(-1, 1, 1, padding.shape[-1])
        attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)
        out = residual + self.self_out(self._merge(attended))
        return out.view(*x.shape[:-2], out.shape[-2], x.shape[-1])


class MatchingModel(nn.Module):
    """The ITM cross-encoder (see the module docstring). Reads frozen backbone features
    (:class:`~fastslow.inputs.FeatureImages`) and ``(N, L, D)`` frozen token states whose padding
    rows are zero; built for the ``pretrained`` backbone."""

    objective = "itm"
    # What the captions are, as :class:`fastslow.stages.Study` provides them to a Slow model.
    reads = "token_states"

    def __init__(
        self, config: CrossAttentionConfig, fast: DualEncoderConfig, image_size: int, text_width: int
    ):
        super().__init__()
        if config.encoder.backbone != "pretrained":
            raise ValueError("the matching model reads frozen features: backbone='pretrained'")
        if config.layers < 2:
            raise ValueError(f"the matching model needs at least 2 layers, got {config.layers}")
        width = config.width
        self.image_tower = build_image_tower(config.encoder)
        self.upsampler = ProgressiveUpsampler(self.image_tower.out_channels, width, config.upsample_steps)
        side = map_side(image_size, self.image_tower.strides[-1 - config.upsample_steps])
        self.grid_shape = (side, side)
        self.row_embedding = nn.Parameter(torch.zeros(side, width))
        self.column_embedding = nn.Parameter(torch.zeros(side, width))
        self.scene_embedding = nn.Parameter(torch.zeros(width))
        for position in (self.row_embedding, self.column_embedding, self.scene_embedding):
            nn.init.normal_(position, std=POSITION_INIT_STD)
        self.scene_projection = nn.Linear(self.image_tower.pooled_dim, width)
        self.visual_projection = nn.Linear(width, width)
        self.visual_norm = nn.LayerNorm(width)
        self.text_projection = nn.Linear(text_width, width)
        self.text_norm = nn.LayerNorm(width)
        self.layers = nn.ModuleList(
            MatchingLayer(width, config.heads, config.ffn_ratio) for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(width)
        self.match_head = nn.Linear(width, 1)
        # The global similarity term: the dual encoder's two heads and its logit scale (trained
        # with the rest, or the trained Fast model's, frozen: load_fast_heads).
        self.embed_dim = fast.embed_dim
        self.embedding_rows = -(-fast.embed_dim // width)  # rows of the width that hold it
        self.image_head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(self.image_tower.pooled_dim, 2 * fast.embed_dim),
            nn.GELU(),
            nn.Linear(2 * fast.embed_dim, fast.embed_dim),
        )
        self.text_head = nn.Sequential(
            nn.Linear(text_width, 2 * fast.embed_dim), nn.GELU(), nn.Linear(2 * fast.embed_dim, fast.embed_dim)
        )
        self.log_global_scale = nn.Parameter(torch.tensor(math.log(1.0 / fast.init_temperature)))

    def load_fast_heads(self, dual_encoder: nn.Module) -> None:
        """Make the global term a trained dual encoder's logit (:class:`~fastslow.models.
        dual_encoder.DualEncoder` on the same frozen features), frozen: its heads and logit scale.

        The cross-attention then learns a correction to the Fast model's similarity, from hard
        negatives that the Fast model confuses; fine-tuning the heads on those alone made them
        worse at the easy cases (validation R@1 fell from 25 to 19 in 100 steps)."""
        self.image_head.load_state_dict(dual_encoder.image_projection.state_dict())
        self.text_head.load_state_dict(dual_encoder.text_projection.state_dict())
        with torch.no_grad():
            self.log_global_scale.copy_(dual_encoder.logit_scale.log())
        for part in (self.image_head, self.text_head):
            part.requires_grad_(False)
        self.log_global_scale.requires_grad_(False)

    def encode_images(self, images: FeatureImages) -> torch.Tensor:
        """Frozen features of B images to ``(B, h * w + 1 + r, W)``: the visual tokens (the grid
        cells with their 2-D positions, then the scene token), then r rows that hold the image's
        global embedding (zero-padded to whole rows; no token attends to them): what a gallery
        stores per image."""
        positions = (self.row_embedding[:, None, :] + self.column_embedding[None, :, :]).flatten(0, 1)
        grid = self.upsampler(self.image_tower(images)).flatten(2).transpose(1, 2) + positions
        pooled = self.image_tower.summary(images)
        scene = self.scene_projection(pooled) + self.scene_embedding
        tokens = self.visual_norm(self.visual_projection(torch.cat([grid, scene[:, None, :]], dim=1)))
        embedding = F.normalize(self.image_head(pooled), dim=-1)
        rows, width = self.embedding_rows, tokens.shape[-1]
        embedding = F.pad(embedding, (0, rows * width - self.embed_dim)).view(-1, rows, width)
        return torch.cat([tokens, embedding], dim=1)

    def visual_keys_values(self, visual: torch.Tensor) -> dict:
        """Each layer's cross-attention keys and values of the visual tokens, and the images'
        global embeddings."""
        rows = self.embedding_rows
        tokens, embedding = visual[:, :-rows], visual[:, -rows:].flatten(1)[:, : self.embed_dim]
        return {"layers": [layer.visual_keys_values(tokens) for layer in self.layers], "global": embedding}

    def text_embedding(self, texts: torch.Tensor) -> torch.Tensor:
        """The global term's caption embedding: the dual encoder's text head on the sentence
        embedding (the masked mean of the token states, L2-normalised, as the Fast model reads it)."""
        real = real_tokens(texts)[..., None].to(texts.dtype)
        sentence = F.normalize((texts * real).sum(-2) / real.sum(-2).clamp_min(1.0), dim=-1)
        return F.normalize(self.text_head(sentence), dim=-1)

    def score_pairs(
        self,
        texts: torch.Tensor,
        keys_values: KeysValues,
        images: torch.Tensor,
        captions: torch.Tensor,
    ) -> torch.Tensor:
        """``(G, n)`` match logits of caption rows ``captions[g]`` of ``texts`` (``(N, L, D)`` token
        states, zero rows at padding) against image ``images[g]`` of ``keys_values``
        (:meth:`visual_keys_values` of the images); ``captions`` may be ``(1, n)`` (every image
        against the same captions)."""
        padding = ~real_tokens(texts)
        global_similarity = (self.text_embedding(texts)[captions] * keys_values["global"][images][:, None]).sum(-1)
        x = self.text_norm(self.text_projection(texts))
        x = self.layers[0].self_attention(x, padding)[captions]  # once per caption
        padding = padding[captions]
        layer_keys_values = gather_keys_values(keys_values["layers"], images)
        x, _ = self.layers[0].attend_image(x, layer_keys_values[0])
        padding = padding.expand(*x.shape[:-1])
        for index, layer in enumerate(self.layers[1:], start=1):
            last = index == len(self.layers) - 1
            x = layer.self_attention(x, padding, first_only=last)
            x, _ = layer.attend_image(x, layer_keys_values[index])
        match = self.match_head(self.norm(x[..., 0, :])).squeeze(-1)
        return match + self.log_global_scale.exp() * global_similarity
