"""The matching Slow model for real photographs: words attend to image regions (``itm``).

On the study's frozen features, with a few thousand captioned photographs, a Slow model has to learn
its cross-modal comparison from scratch, and how it compares decides whether it learns at all.
Measured on Flickr8k (3,500 training images, t2i R@1 on 500 validation images; the Fast model:
20.2): an ALBEF-style cross-encoder (caption self-attention, cross-attention and feed-forward
blocks, a match logit read from the [CLS] state) trained 8 epochs scored 13.6, and all of that came
from its global term: its cross-attention logit alone ranked images at chance (0.2), varying ten
times more across captions than across images. A linear match head on the fused state learns a
caption-image interaction only through the attention weights and a small feed-forward, and did not
in that budget. So this model scores the way SCAN's text-to-image attention does (Lee et al., 2018):

* text: each MiniLM token state (cached with the features, L2-normalised) through the text head to
  a word embedding in a joint space (as wide as the Fast model's), and the caption's sentence
  embedding (the masked mean, as the Fast model reads it) through the same head;
* image: EfficientNet-Lite0's head (:func:`~fastslow.models.pretrained.frozen_head`) applied to
  each cell of the cached stride-32 map, so every cell has the 1,280 features the pooled vector
  averages (the Fast model's input): the Slow model sees what the Fast one sees, and where; the
  image head takes cells and the pooled vector to the joint space; a
  :class:`~fastslow.models.cross_attention.ProgressiveUpsampler` over the cell embeddings and the
  finer maps makes the visual tokens (``upsample_steps``: 7x7, 14x14, 28x28 at 224 pixels);
* cross-attention: each word attends to the visual tokens (softmax of its cosine similarities times
  a learned inverse temperature) and is compared with what it attended to; the alignment is a
  weighted mean of those cosines over the caption's words, the weights a softmax over the words of
  a learned linear function of their token states (on 2,500 validation captions: R@1 19.4 against
  18.4 with a plain mean, the Fast model 19.8);
* score: ``s_g * cos(sentence, image) + s_a * alignment``, both scales learned. The global term is
  ALBEF's and BLIP's habit of adding the contrastive similarity to the match score when they
  re-rank; here it trains with the rest, from scratch: started from the trained Fast heads, the
  model got worse as it trained (validation R@1 20.2 at the start, 18.4-19.8 after), because the
  Fast model ranks its own training captions far better than new ones (R@1 60.8 against 20.2) and
  has little left to learn there. Without the alignment term (the global term alone), the same
  training reached validation R@1 19.2 alone and 20.8 added to the Fast logit, against 21.0 and
  23.4 with it (a first form of the model, 500 validation captions): the gain in combination is
  the cross-attention's, not a second dual encoder's.

Cost per pair: the caption's word embeddings are computed once per caption, each image's visual
tokens once per image; a pair costs the L x T word-token similarities and their softmax, and the
norm of what each word attended to: about L x T x (width + T) multiply-adds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastslow.config import CrossAttentionConfig, DualEncoderConfig
from fastslow.inputs import FeatureImages, real_tokens
from fastslow.models.cross_attention import ProgressiveUpsampler, map_side
from fastslow.models.encoders import build_image_tower
from fastslow.models.pretrained import frozen_head

# Initial inverse temperatures: the scores' as CLIP starts its logits (1 / 0.07), the attention's
# as SCAN's text-to-image softmax (about 9-10).
INITIAL_SCORE_SCALE = 1.0 / 0.07
INITIAL_ATTENTION_SCALE = 10.0
MAX_SCALE = 100.0


def _head(in_width: int, width: int) -> nn.Sequential:
    """The Fast model's kind of projection head: two layers, GELU between."""
    return nn.Sequential(nn.Linear(in_width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))


class MatchingModel(nn.Module):
    """The matching Slow model (see the module docstring). Reads frozen backbone features
    (:class:`~fastslow.inputs.FeatureImages`) and ``(N, L, D)`` frozen token states whose padding
    rows are zero; built for the ``pretrained`` backbone. The joint space has the Fast model's
    ``embed_dim`` dimensions (``fast``), so both compare captions and images in spaces of one size
    (``config.width`` and ``layers`` size the caption decoders of the other Slow kinds)."""

    objective = "itm"
    # What the captions are, as :class:`fastslow.stages.Study` provides them to a Slow model.
    reads = "token_states"

    def __init__(
        self, config: CrossAttentionConfig, fast: DualEncoderConfig, image_size: int, text_width: int
    ):
        super().__init__()
        if config.encoder.backbone != "pretrained":
            raise ValueError("the matching model reads frozen features: backbone='pretrained'")
        width = fast.embed_dim
        self.image_tower = build_image_tower(config.encoder)
        self.cell_features = frozen_head()
        self.image_head = _head(self.image_tower.pooled_dim, width)
        finer_channels = self.image_tower.out_channels[:-1]
        self.upsampler = ProgressiveUpsampler((*finer_channels, width), width, config.upsample_steps)
        side = map_side(image_size, self.image_tower.strides[-1 - config.upsample_steps])
        self.grid_shape = (side, side)
        self.text_head = _head(text_width, width)
        self.word_weight = nn.Linear(text_width, 1)
        log_scale = torch.tensor(math.log(INITIAL_SCORE_SCALE))
        self.log_global_scale = nn.Parameter(log_scale.clone())
        self.log_alignment_scale = nn.Parameter(log_scale.clone())
        self.log_attention_scale = nn.Parameter(torch.tensor(math.log(INITIAL_ATTENTION_SCALE)))

    def encode_images(self, images: FeatureImages) -> torch.Tensor:
        """Frozen features of B images to ``(B, h * w + 1, W)`` unit vectors: the visual tokens, then
        the image's global embedding (what a gallery stores per image)."""
        cells = self.cell_features(images.maps[-1]).permute(0, 2, 3, 1)
        coarse = self.image_head(cells).permute(0, 3, 1, 2)
        grid = self.upsampler([*images.maps[:-1], coarse]).flatten(2).transpose(1, 2)
        pooled = self.image_head(self.image_tower.summary(images))
        return F.normalize(torch.cat([grid, pooled[:, None]], dim=1), dim=-1)

    @staticmethod
    def visual_keys_values(visual: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a pair reads of its image: the visual tokens (keys and values alike) and the global
        embedding."""
        return {"tokens": visual[:, :-1], "global": visual[:, -1]}

    def encode_texts(self, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(N, L, D)`` token states to ``(N, L, W)`` unit word embeddings, ``(N, L)`` word weights
        (summing to 1 over each caption's real tokens) and ``(N, W)`` unit sentence embeddings."""
        real = real_tokens(texts)
        weights = real[..., None].to(texts.dtype)
        sentence = F.normalize((texts * weights).sum(-2) / weights.sum(-2).clamp_min(1.0), dim=-1)
        states = F.normalize(texts, dim=-1)
        words = F.normalize(self.text_head(states), dim=-1)
        importance = self.word_weight(states).squeeze(-1).masked_fill(~real, -torch.inf)
        word_weights = torch.softmax(importance, dim=-1).nan_to_num(0.0)  # an empty caption: none
        return words, word_weights, F.normalize(self.text_head(sentence), dim=-1)

    def _scale(self, log_scale: nn.Parameter) -> torch.Tensor:
        return log_scale.clamp(max=math.log(MAX_SCALE)).exp()

    def score_pairs(
        self,
        texts: torch.Tensor,
        keys_values: dict[str, torch.Tensor],
        images: torch.Tensor,
        captions: torch.Tensor,
    ) -> torch.Tensor:
        """``(G, n)`` scores of caption rows ``captions[g]`` of ``texts`` (``(N, L, D)`` token states,
        zero rows at padding) against image ``images[g]`` of ``keys_values``
        (:meth:`visual_keys_values` of the images); ``captions`` may be ``(1, n)`` (every image
        against the same captions)."""
        words, word_weights, sentences = self.encode_texts(texts)
        words, word_weights = words[captions], word_weights[captions]
        tokens = keys_values["tokens"][images]
        global_similarity = (sentences[captions] * keys_values["global"][images][:, None]).sum(-1)
        similarity = torch.einsum("gnlw,gtw->gnlt", words, tokens)
        attention = torch.softmax(self._scale(self.log_attention_scale) * similarity, dim=-1)
        # cos(word, attended) without forming the attended vectors (G x n x L x width): the word's
        # dot product with them is its attention-weighted similarity, and their squared norm is
        # the attention weights through the tokens' Gram matrix (T x T per image).
        gram = tokens @ tokens.transpose(-1, -2)
        squared_norm = (torch.einsum("gnlt,gts->gnls", attention, gram) * attention).sum(-1)
        word_alignment = (attention * similarity).sum(-1) / squared_norm.clamp_min(1e-12).sqrt()
        alignment = (word_alignment * word_weights).sum(-1)
        return self._scale(self.log_global_scale) * global_similarity + self._scale(
            self.log_alignment_scale
        ) * alignment


class SlowEnsemble(nn.Module):
    """The mean score of Slow models of one kind and config trained with different seeds.

    On Flickr8k's 2,500 validation captions (Fast model: t2i R@1 19.8), three matching models
    scored 17.1, 18.3 and 18.1 alone, their mean score 21.0 (20.3 for the first two), and added to
    the Fast logit 21.3 for the first alone against 22.8 for the three: seeds err on different
    images, so their mean ranks better than any of them (with the moving average of their
    weights, after 8 epochs: 20.0, 19.2 and 19.4 alone, 22.2 their mean; ``fastslow.config``).
    A pair costs each member's pair.

    The gallery stores the members' visual tokens side by side (concatenated along the width), so
    galleries, caches and scoring treat the ensemble as one Slow model."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        first = members[0]
        self.objective, self.reads, self.grid_shape = first.objective, first.reads, first.grid_shape

    @property
    def image_tower(self) -> nn.Module:
        return self.members[0].image_tower

    def encode_images(self, images: FeatureImages) -> torch.Tensor:
        return torch.cat([member.encode_images(images) for member in self.members], dim=-1)

    def visual_keys_values(self, visual: torch.Tensor) -> list:
        chunks = visual.chunk(len(self.members), dim=-1)
        return [member.visual_keys_values(chunk) for member, chunk in zip(self.members, chunks)]

    def score_pairs(
        self, texts: torch.Tensor, keys_values: list, images: torch.Tensor, captions: torch.Tensor
    ) -> torch.Tensor:
        """The members' :meth:`MatchingModel.score_pairs`, averaged."""
        scores = [
            member.score_pairs(texts, member_keys_values, images, captions)
            for member, member_keys_values in zip(self.members, keys_values)
        ]
        return torch.stack(scores).mean(0)
