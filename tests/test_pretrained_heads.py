"""The Fast and Slow heads on frozen pretrained features (backbone "pretrained").

Unit tests use random features of the right shapes; one test runs the whole path (extraction,
dual encoder, cross-attention model, Slow scores, search) on a tiny Flickr8k-layout folder.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fastslow import evaluation, stages
from fastslow.rerank import Searcher
from fastslow.config import CrossAttentionConfig, DualEncoderConfig, EncoderConfig, make_config
from fastslow.data.text import WordTokenizer
from fastslow.models.cross_attention import CrossAttentionModel, pair_scores, visual_tokens
from fastslow.models.dual_encoder import DualEncoder, embed_images, embed_texts
from fastslow.inputs import FEATURE_CHANNELS, POOLED_DIM, FeatureImages, model_input

PRETRAINED = EncoderConfig(backbone="pretrained")


def random_features(n: int, image_size: int = 64, seed: int = 0) -> FeatureImages:
    """Float16 features shaped like EfficientNet-Lite0's at strides 8/16/32 for ``image_size`` input."""
    generator = torch.Generator().manual_seed(seed)
    maps = [
        torch.randn(n, channels, image_size // stride, image_size // stride, generator=generator).half()
        for channels, stride in zip(FEATURE_CHANNELS, (8, 16, 32))
    ]
    return FeatureImages(maps, torch.randn(n, POOLED_DIM, generator=generator))


def test_feature_images_index_like_an_image_array():
    features = random_features(6)
    assert len(features) == 6 and len(features[1:4]) == 3
    picked = features[np.array([5, 0])]
    assert torch.equal(picked.pooled, features.pooled[[5, 0]]) and torch.equal(picked.maps[2], features.maps[2][[5, 0]])
    batch = model_input(picked)
    assert all(m.dtype == torch.float32 for m in batch.maps) and batch.pooled.dtype == torch.float32


def test_dual_encoder_on_features_embeds_pooled_images_and_sentence_features():
    model = DualEncoder(vocab_size=10, config=DualEncoderConfig(encoder=PRETRAINED), image_size=64)
    images = embed_images(model, random_features(5))
    texts = embed_texts(model, torch.randn(7, PRETRAINED.pretrained_text_width))
    assert images.shape == (5, 128) and texts.shape == (7, 128)
    assert torch.allclose(images.norm(dim=1), torch.ones(5)) and torch.allclose(texts.norm(dim=1), torch.ones(7))
    assert all(p.requires_grad for p in model.parameters()), "the heads train; the backbones are not in the model"


@pytest.mark.parametrize("steps, side", [(0, 2), (1, 4), (2, 8)])
def test_cross_attention_upsamples_the_coarse_feature_map(steps, side):
    config = CrossAttentionConfig(encoder=PRETRAINED, upsample_steps=steps)
    model = CrossAttentionModel(vocab_size=12, config=config, image_size=64)
    gallery = visual_tokens(model, random_features(3))
    assert model.grid_shape == (side, side) and gallery.shape == (3, side * side, config.width)
    tokens = torch.tensor([[1, 4, 5, 6, 2], [1, 7, 2, 0, 0]])
    scores = pair_scores(model, gallery, tokens, torch.arange(3).expand(2, 3))
    one_by_one = torch.stack([pair_scores(model, gallery[i : i + 1], tokens, torch.zeros(2, 1, dtype=torch.long))[:, 0] for i in range(3)], 1)
    assert torch.allclose(scores, one_by_one, atol=1e-5)


def test_rare_words_become_unknown_with_a_minimum_count():
    tokenizer = WordTokenizer.fit(["a dog runs", "a dog sits", "a cat"], min_count=2)
    assert tokenizer.words == ["a", "dog"]
    assert tokenizer.decode(tokenizer.encode(["a cat runs"])[0]) == "a <unk> <unk>"


def test_config_gives_the_pretrained_backbone_its_image_size_and_refuses_clips():
    cfg = make_config("smoke", dataset="flickr8k", data_dir="x", backbone="pretrained")
    assert cfg.data.image_size == 224 and cfg.cross.encoder.min_word_count == 5
    assert make_config("smoke").dual.encoder.min_word_count == 1
    with pytest.raises(ValueError, match="pretrained video towers are not built"):
        make_config("smoke", dataset="shapes-video", backbone="pretrained")


def test_whole_path_on_a_tiny_real_folder(tiny_real, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSLOW_CACHE", str(tmp_path / "cache"))
    cfg = make_config("smoke", dataset="flickr8k", data_dir=tiny_real.data_dir, backbone="pretrained", device="cpu")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=64), cross=dataclasses.replace(cfg.cross, validation_images=2))
    data = stages.load_study(cfg)
    assert isinstance(data.visual["train"], FeatureImages) and len(data.visual["train"]) == 5
    assert data.texts["test"].shape == (4, 384) and data.tokens["test"].shape[0] == 4

    fast = stages.train_or_load_dual_encoder(cfg, data)
    fast_scores = evaluation.headline_fast_scores(fast.model, data, cfg.device)
    assert fast_scores.shape == (2, 2)
    slow = stages.train_or_load_cross_attention(cfg, data)
    slow_scores = evaluation.headline_slow_scores(cfg, data, slow)
    assert slow_scores.shape == (2, 2) and torch.isfinite(slow_scores).all()

    found = Searcher(fast.model, slow.model, data, cfg.device).search("a photo number 5", k=2, rerank_k=2)
    assert sorted(found["fast_image"]) == [0, 1] and sorted(found["fast_slow_image"]) == [0, 1]


def test_the_pretrained_budget_trims_the_slow_ablations_and_a_profile_can_skip_them():
    cfg = make_config("quick", dataset="flickr8k", data_dir="x", backbone="pretrained")
    assert cfg.cross_ablation.upsample_steps == (0, 1) and make_config("quick").cross_ablation.upsample_steps == (0, 1, 2)
    assert cfg.cross.objective == "itm" and cfg.headline_captions_per_image == 5
    assert cfg.slow_members == 3 and make_config("quick").slow_members == 1
    assert max(cfg.rerank.scale_sizes) == 100_000 and max(make_config("quick").rerank.scale_sizes) == 1_000_000
    skipped = evaluation.cross_attention_variants(cfg, None, {"up0": {"upsample_steps": 0}}, np.array([], dtype=np.int64))
    assert skipped == {}, "no variant is trained (data=None would fail) when there are no queries"


def test_a_query_runs_minilm_once_for_both_models(monkeypatch):
    calls = []

    class MiniLM:
        def __call__(self, captions, max_tokens):
            calls.append(list(captions))
            states, mask = torch.ones(len(captions), 3, 4), torch.tensor([[True, True, False]] * len(captions))
            return dataclasses.make_dataclass("Features", ["pooled", "states", "mask", "ids"])(
                states.mean(1), states, mask, torch.zeros(len(captions), 3, dtype=torch.long))

    monkeypatch.setattr(stages, "text_backbone", MiniLM)
    cfg = make_config("smoke", dataset="flickr8k", data_dir="unused", backbone="pretrained")
    data = stages.Study(cfg, {}, None, {}, {}, {})
    encode_slow = data.slow_encoder("token_states")
    for caption in ("a dog runs", "a cat sleeps"):
        data.fast_texts([caption])
        states = encode_slow([caption])
    assert calls == [["a dog runs"], ["a cat sleeps"]]  # one pass per query, both models fed
    assert states.shape == (1, 3, 4) and states[0, 2].abs().sum() == 0  # zero at padding
