"""The matching Slow model for real photographs and the negatives it learns from."""

import math

import numpy as np
import pytest
import torch

from fastslow.config import CrossAttentionConfig, DualEncoderConfig, EncoderConfig
from fastslow.data.types import CaptionedImages
from fastslow.inputs import FEATURE_CHANNELS, FeatureImages
from fastslow.losses import matching_loss
from fastslow.models.cross_attention import gather_keys_values, pair_scores, visual_tokens
from fastslow.models.matching import MatchingModel, SlowEnsemble
from fastslow.negatives import (
    LookAlikeBatches,
    NegativeBatches,
    NegativePools,
    look_alike_order,
    mine_pools,
    normalised_caption,
)

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
    config = CrossAttentionConfig(encoder=PRETRAINED, objective="itm", upsample_steps=steps)
    return MatchingModel(config, DualEncoderConfig(encoder=PRETRAINED, embed_dim=16), 64, TEXT_WIDTH).eval()


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
    for token in (0, 5):
        changed = texts.clone()
        changed[0, token] += 1.0
        assert not torch.allclose(pair_scores(model, gallery, changed, torch.arange(2)[None]), scores)


def test_matching_score_is_the_global_similarity_plus_the_words_alignment_with_what_they_attend():
    """The score written out the long way: each word's softmax attention over the visual tokens, the
    cosine of the word with the attended vector, their mean over real words weighted by the
    softmax of the word-weight layer, plus the global cosine; the model computes the attended
    vectors' norms through the tokens' Gram matrix."""
    model = matching_model(steps=0)
    with torch.no_grad():
        model.log_global_scale.fill_(0.5)
        model.log_alignment_scale.fill_(2.0)
    images, texts = features(3), token_states([4, 6])
    gallery = visual_tokens(model, images)
    scores = pair_scores(model, gallery, texts, torch.arange(3).expand(2, 3))
    words, _, sentences = model.encode_texts(texts)
    tokens, global_embeddings = gallery[:, :-1], gallery[:, -1]
    expected = torch.empty(2, 3)
    for caption, length in enumerate((4, 6)):
        for image in range(3):
            w = words[caption, :length]
            attention = torch.softmax(model.log_attention_scale.exp() * w @ tokens[image].T, dim=-1)
            attended = torch.nn.functional.normalize(attention @ tokens[image], dim=-1)
            importance = model.word_weight(torch.nn.functional.normalize(texts[caption, :length], dim=-1))
            alignment = (torch.softmax(importance.squeeze(-1), 0) * (w * attended).sum(-1)).sum()
            cosine = sentences[caption] @ global_embeddings[image]
            expected[caption, image] = math.exp(0.5) * cosine + math.exp(2.0) * alignment
    torch.testing.assert_close(scores, expected.detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("steps", [0, 1])
def test_visual_tokens_cover_the_grid_the_upsampling_asks_for(steps):
    model = matching_model(steps)
    tokens = visual_tokens(model, features(2))
    rows, columns = model.grid_shape
    assert (rows, columns) == ((2, 2), (4, 4))[steps]  # the test maps are 8, 4 and 2 cells wide
    assert tokens.shape == (2, rows * columns + 1, 16)
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(2, rows * columns + 1))


def test_matching_loss_trains_every_part():
    model = matching_model().train()
    batch = {"images": features(4), "tokens": token_states([4, 5, 3, 6])}
    loss, extras = matching_loss(model, batch, 0.0)
    loss.backward()
    assert torch.isfinite(loss) and set(extras) == {"t2i", "i2t"}
    for name in ("upsampler.coarse_lateral.weight", "upsampler.laterals.0.weight", "text_head.0.weight",
                 "image_head.2.weight", "word_weight.weight", "log_global_scale", "log_alignment_scale", "log_attention_scale"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert not any(p.requires_grad for p in model.cell_features.parameters())


def test_matching_model_cells_average_to_the_pooled_features_the_backbone_gives():
    """The frozen head applied cell by cell gives the features the backbone pools: the cached
    stride-32 map and the cached pooled vector agree through it."""
    from fastslow.models.pretrained import image_backbone

    backbone = image_backbone()
    pixels = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        maps, pooled = backbone.features(pixels)
        cells = matching_model().cell_features(maps[-1])
    torch.testing.assert_close(cells.mean(dim=(2, 3)), pooled)


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


def test_look_alike_batches_hold_every_image_once_with_the_caption_drawn_for_it():
    split = captioned([
        ["A dog runs.", "a dog runs"], ["A dog runs", "two dogs"], ["a cat sleeps"], ["a red car"],
        ["people walk"], ["a boat"], ["a tree"], ["a bird", "a bird flies"],
    ])
    scores = torch.randn(len(split.captions), len(split), generator=torch.Generator().manual_seed(1))
    pools = mine_pools(scores, split, pool=3)
    texts, visual = token_states([3] * len(split.captions)), features(len(split))
    make = lambda epoch: LookAlikeBatches(split, texts, visual, pools, hard=2, batch_size=4, seed=0, epoch=epoch)
    batches = make(0)
    assert sorted(batches.order.tolist()) == list(range(len(split)))
    np.testing.assert_array_equal(make(0).order, batches.order)
    assert not np.array_equal(make(1).order, batches.order) or not np.array_equal(make(2).order, batches.order)
    assert len(batches) == 2
    batch = next(iter(batches))
    assert batch["tokens"].shape[0] == batch["images"].pooled.shape[0] == 4
    torch.testing.assert_close(batch["tokens"], texts[batches.caption_of[batch["image_index"].numpy()]])


def test_look_alike_order_groups_the_anchor_with_the_first_unplaced_images_of_its_pool():
    pools = NegativePools(images=np.array([[1, 2, 3], [0, 2, 3], [3, 0, 1], [2, 1, 0]]), captions=None)
    caption_of = np.arange(4)
    order = look_alike_order(caption_of, pools, group=2, rng=np.random.default_rng(0))
    first = order[0]
    assert order[1] == next(c for c in pools.images[first])
    assert sorted(order.tolist()) == [0, 1, 2, 3]
    assert set(order[2:].tolist()) == {0, 1, 2, 3} - {order[0], order[1]}


def test_mining_rejects_nothing_it_should_keep():
    split = captioned([["a"], ["b"], ["c"], ["d"]])
    scores = torch.tensor([[0.0, 5, 4, 1], [5, 0, 3, 2], [4, 3, 0, 6], [1, 2, 6, 0]])
    pools = mine_pools(scores, split, pool=2)
    assert pools.images.tolist() == [[1, 2], [0, 2], [3, 0], [2, 1]]
    assert pools.captions.tolist() == [[1, 2], [0, 2], [3, 0], [2, 1]]


def test_matching_model_refuses_pixels():
    config = CrossAttentionConfig(encoder=EncoderConfig(), objective="itm")
    with pytest.raises(ValueError, match="backbone='pretrained'"):
        MatchingModel(config, DualEncoderConfig(), 16, 8)


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


def test_an_ensemble_scores_the_mean_of_its_members_through_one_gallery():
    first = matching_model()
    torch.manual_seed(1)
    config = CrossAttentionConfig(encoder=PRETRAINED, objective="itm", upsample_steps=1)
    second = MatchingModel(config, DualEncoderConfig(encoder=PRETRAINED, embed_dim=16), 64, TEXT_WIDTH).eval()
    ensemble = SlowEnsemble([first, second])
    images, texts = features(4), token_states([5, 3, 7])
    candidates = torch.tensor([[0, 1], [2, 3], [3, 0]])
    members = [pair_scores(m, visual_tokens(m, images), texts, candidates) for m in (first, second)]
    gallery = visual_tokens(ensemble, images)
    assert gallery.shape[-1] == 2 * visual_tokens(first, images).shape[-1]
    torch.testing.assert_close(pair_scores(ensemble, gallery, texts, candidates), (members[0] + members[1]) / 2)
    assert not torch.allclose(members[0], members[1])
    assert ensemble.reads == first.reads and ensemble.grid_shape == first.grid_shape
