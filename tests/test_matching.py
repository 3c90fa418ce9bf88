"""The matching Slow model for real photographs and the negatives it learns from."""

import dataclasses

import numpy as np
import pytest
import torch

from fastslow.config import CrossAttentionConfig, DualEncoderConfig, EncoderConfig
from fastslow.data.types import CaptionedImages
from fastslow.inputs import FEATURE_CHANNELS, FeatureImages
from fastslow.losses import listwise_matching_loss
from fastslow.models.cross_attention import gather_keys_values, pair_scores, visual_tokens
from fastslow.models.dual_encoder import DualEncoder
from fastslow.models.matching import MatchingModel
from fastslow.negatives import NegativeBatches, mine_pools, normalised_caption

PRETRAINED = EncoderConfig(backbone="pretrained")
TEXT_WIDTH = 24


def features(n: int, seed: int = 0) -> FeatureImages:
    generator = torch.Generator().manual_seed(seed)
    maps = [torch.randn(n, c, s, s, generator=generator) for c, s in zip(FEATURE_CHANNELS, (8, 4, 2))]
    return FeatureImages(maps, torch.randn(n, 1280, generator=generator))


def token_states(lengths: list[int], width: int = TEXT_WIDTH, seed: int = 1) -> torch.Tensor:
    """Token states of captions of ``lengths`` tokens, zero at padding."""
    states = torch.randn(len(lengths), max(lengths), width, generator=torch.Generator().manual_seed(seed))
    for row, length in enumerate(lengths):
        states[row, length:] = 0
    return states


def matching_model(steps: int = 1) -> MatchingModel:
    torch.manual_seed(0)
    config = CrossAttentionConfig(encoder=PRETRAINED, objective="itm", upsample_steps=steps, width=32, layers=2)
    return MatchingModel(config, DualEncoderConfig(encoder=PRETRAINED, embed_dim=16), 16, TEXT_WIDTH).eval()


def test_matching_score_does_not_change_with_padding():
    model = matching_model()
    images = features(3)
    texts = token_states([5, 3, 7])
    gallery = visual_tokens(model, images)
    everyone = torch.arange(3).expand(3, 3)
    scores = pair_scores(model, gallery, texts, everyone)
    padded = torch.cat([texts, torch.zeros(3, 6, TEXT_WIDTH)], dim=1)
    assert torch.allclose(pair_scores(model, gallery, padded, everyone), scores, atol=1e-5)
    alone = pair_scores(model, gallery, texts[1:2, :3], torch.arange(3)[None])
    assert torch.allclose(alone, scores[1:2], atol=1e-5)


def test_matching_score_depends_on_the_image_and_every_caption_token():
    model = matching_model()
    gallery = visual_tokens(model, features(2))
    texts = token_states([6])
    scores = pair_scores(model, gallery, texts, torch.arange(2)[None])
    assert not torch.isclose(scores[0, 0], scores[0, 1])
    changed = texts.clone()
    changed[0, 4] += 1.0  # a token after the first: the [CLS] state must see it
    assert not torch.allclose(pair_scores(model, gallery, changed, torch.arange(2)[None]), scores)


def test_matching_model_starts_from_the_fast_models_similarity():
    """With the match head silenced, the score is the dual encoder's logit: the Slow model starts
    where the Fast one stands."""
    model = matching_model(steps=0)
    fast = DualEncoder(1, DualEncoderConfig(encoder=PRETRAINED, embed_dim=16), 16)
    fast.text_projection = torch.nn.Sequential(
        torch.nn.Linear(TEXT_WIDTH, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)
    )
    model.load_fast_heads(fast)
    torch.nn.init.zeros_(model.match_head.weight)
    torch.nn.init.zeros_(model.match_head.bias)
    images, texts = features(4), token_states([4, 6, 5])
    scores = pair_scores(model, visual_tokens(model, images), texts, torch.arange(4).expand(3, 4))
    real = (texts != 0).any(-1, keepdim=True).float()
    sentence = torch.nn.functional.normalize((texts * real).sum(1) / real.sum(1), dim=-1)
    with torch.no_grad():
        expected = fast(images, sentence)
    assert torch.allclose(scores, expected, atol=1e-4)


def test_listwise_loss_trains_every_part():
    model = matching_model().train()
    pairs, negatives = 3, 2
    images = features(pairs * (1 + negatives))
    texts = token_states([4, 5, 3, 6, 2, 4, 5, 3, 4])
    batch = {
        "tokens": texts[:pairs], "negative_tokens": texts[pairs:],
        "all_tokens": texts, "all_images": images,
    }
    loss, extras = listwise_matching_loss(in_batch_negatives=2)(model, batch, 0.0)
    loss.backward()
    assert torch.isfinite(loss) and set(extras) == {"t2i", "i2t"}
    for name in ("upsampler.coarse_lateral.weight", "layers.0.cross_query.weight", "match_head.weight",
                 "text_head.0.weight", "image_head.1.weight", "log_global_scale"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def captioned(captions: list[list[str]]) -> CaptionedImages:
    n = len(captions)
    flat = [c for group in captions for c in group]
    return CaptionedImages(
        dataset="toy", split="train", images=np.zeros((n, 2, 2, 3), np.uint8), captions=flat,
        caption_image=np.repeat(np.arange(n), [len(g) for g in captions]),
        image_ids=[str(i) for i in range(n)], twin=-np.ones(n), twin_kind=[""] * n,
        caption_kind=[""] * len(flat), skipped=[],
    )


def test_mined_negatives_never_hold_a_positive_or_a_caption_saying_the_same():
    split = captioned([
        ["A dog runs.", "a dog runs", "brown dog"],
        ["A dog runs", "two dogs"],  # says what image 0 says
        ["a cat sleeps", "cat on a sofa"],
        ["a red car", "a car"],
        ["people walk", "a crowd"],
        ["a boat", "a boat on water"],
    ])
    scores = torch.randn(len(split.captions), len(split), generator=torch.Generator().manual_seed(0))
    pools = mine_pools(scores, split, pool=3)
    texts = torch.randn(len(split.captions), 4, 8)
    visual = features(len(split))
    same_text = {normalised_caption(c) for c in ("A dog runs.",)}
    caption_image = split.caption_image
    for epoch in range(5):
        batches = NegativeBatches(
            split, texts, visual, pools, hard=2, batch_size=6, seed=0, epoch=epoch
        )
        for image, caption in enumerate(batches.caption_of):
            negative_images = batches.negative_images[image]
            assert image not in negative_images
            assert len(set(negative_images.tolist())) == len(negative_images)
            if normalised_caption(split.captions[caption]) in same_text:  # image 1 says it too
                assert 1 not in negative_images and 0 not in negative_images
            negative_captions = batches.negative_captions[image]
            assert len(set(negative_captions.tolist())) == len(negative_captions)
            own_texts = {normalised_caption(split.captions[c]) for c in np.flatnonzero(caption_image == image)}
            for negative in negative_captions:
                assert caption_image[negative] != image
                if negative in pools.captions[image]:
                    assert normalised_caption(split.captions[negative]) not in own_texts
    batch = next(iter(batches))
    assert len(batch["negative_images"]) == 2 * len(batch["images"])
    assert batch["all_tokens"].shape[0] == 3 * len(batch["tokens"])


def test_mining_rejects_nothing_it_should_keep():
    split = captioned([["a"], ["b"], ["c"], ["d"]])
    scores = torch.tensor([[0.0, 5, 4, 1], [5, 0, 3, 2], [4, 3, 0, 6], [1, 2, 6, 0]])
    pools = mine_pools(scores, split, pool=2)
    assert pools.images.tolist() == [[1, 2], [0, 2], [3, 0], [2, 1]]
    assert pools.captions.tolist() == [[1, 2], [0, 2], [3, 0], [2, 1]]


@pytest.mark.parametrize("layers", [1])
def test_matching_model_refuses_one_layer(layers):
    config = CrossAttentionConfig(encoder=PRETRAINED, objective="itm", layers=layers)
    with pytest.raises(ValueError, match="at least 2 layers"):
        MatchingModel(config, DualEncoderConfig(encoder=PRETRAINED), 16, TEXT_WIDTH)
    with pytest.raises(ValueError, match="backbone='pretrained'"):
        MatchingModel(dataclasses.replace(config, encoder=EncoderConfig(), layers=2), DualEncoderConfig(), 16, 8)


def test_gathered_keys_values_have_index_selects_values_and_gradients():
    # The gradient arrives head-split and non-contiguous, as SDPA's does; repeated rows add up.
    keys, values = torch.randn(5, 197, 4, 16).transpose(1, 2), torch.randn(5, 4, 197, 16)
    images = torch.tensor([3, 0, 3, 3, 1])
    grad = torch.randn(len(images), 197, 4, 16).transpose(1, 2)
    gradients = []
    for gather in (gather_keys_values, lambda kv, i: [(k.index_select(0, i), v.index_select(0, i)) for k, v in kv]):
        source = [(keys.clone().requires_grad_(), values.clone().requires_grad_())]
        (gathered_keys, gathered_values), = gather(source, images)
        ((gathered_keys * grad).sum() + (gathered_values * grad).sum()).backward()
        gradients.append((gathered_keys.detach(), source[0][0].grad, source[0][1].grad))
    for ours, reference in zip(*gradients):
        torch.testing.assert_close(ours, reference)
    assert gradients[0][1][2].abs().sum() == 0  # image 2 was never gathered
