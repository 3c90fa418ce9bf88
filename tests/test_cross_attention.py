"""The Slow model: upsampler shapes, causal decoders, cached and batched scoring, the objectives."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fastslow import cache, losses, stages
from fastslow.config import config_hash
from fastslow.config import OBJECTIVES, CrossAttentionConfig, DualEncoderConfig, EncoderConfig, TrainConfig, make_config
from fastslow.batches import PairBatches
from fastslow.data.shapes import make_shapes
from fastslow.data.text import WordTokenizer
from fastslow.models.cross_attention import (
    CrossAttentionModel,
    ProgressiveUpsampler,
    cross_attention_maps,
    itm_negatives,
    keep_twins_together,
    pair_scores,
    reverse_captions,
    teacher_forcing,
    visual_tokens,
)
from fastslow.inputs import model_input
from fastslow.models.encoders import ConvTower

IMAGE_SIZE = 32
TINY_ENCODER = EncoderConfig(channels=(8, 8, 16, 16), text_width=16, text_layers=1, heads=2)
TINY = CrossAttentionConfig(
    encoder=TINY_ENCODER, tower_init="scratch", train_tower=True, width=16, layers=2, heads=2, ffn_ratio=2
)


@pytest.fixture(scope="module")
def shapes():
    splits = make_shapes(24, 8, 12, image_size=IMAGE_SIZE, captions_per_image=2, seed=3)
    tokenizer = WordTokenizer.fit(splits["train"].captions)
    return splits, tokenizer


def tiny_model(tokenizer: WordTokenizer, seed: int = 0, **overrides) -> CrossAttentionModel:
    torch.manual_seed(seed)
    return CrossAttentionModel(tokenizer.vocab_size, dataclasses.replace(TINY, **overrides), IMAGE_SIZE).eval()


def test_upsampler_doubles_the_grid_at_each_step():
    tower = ConvTower((8, 8, 16, 16))
    maps = tower(torch.randn(2, 3, 48, 48))
    assert [m.shape[-1] for m in maps] == [12, 6, 3]
    for steps, side in [(0, 3), (1, 6), (2, 12)]:
        grid = ProgressiveUpsampler(tower.out_channels, 20, steps)(maps)
        assert grid.shape == (2, 20, side, side)
    with pytest.raises(ValueError, match="upsample_steps"):
        ProgressiveUpsampler(tower.out_channels, 20, 3)


@pytest.mark.parametrize("steps, side", [(0, 2), (1, 4), (2, 8)])
def test_visual_tokens_are_the_grid_cells(shapes, steps, side):
    splits, tokenizer = shapes
    model = tiny_model(tokenizer, upsample_steps=steps)
    tokens = visual_tokens(model, splits["test"].images, batch_size=5)
    assert tokens.shape == (len(splits["test"]), side * side, TINY.width)
    assert model.grid_shape == (side, side)


def test_reverse_captions_keeps_bos_eos_and_padding():
    tokens = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 8, 2, 0, 0, 0]])
    assert reverse_captions(tokens).tolist() == [[1, 7, 6, 5, 2, 0], [1, 8, 2, 0, 0, 0]]


def token_log_probs(model: CrossAttentionModel, images, tokens: torch.Tensor, direction: str) -> torch.Tensor:
    """Log-probability of every predicted token, ``(B, L - 1)``, in the decoder's reading order, of
    uint8 ``images`` or frozen features."""
    keys_values = model.visual_keys_values(model.encode_images(model_input(images)))[direction]
    inputs, targets = teacher_forcing(tokens, direction)
    states, _ = model.decoder_states(direction, inputs, keys_values)
    log_probs = model.decoders[direction].head(states[:, 0]).log_softmax(-1)
    return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def test_no_future_token_leaks_into_either_decoder(shapes):
    splits, tokenizer = shapes
    model = tiny_model(tokenizer)
    images = splits["train"].images[:1]
    tokens = tokenizer.encode(["a big red circle left of a small blue square"])  # BOS + 9 words + EOS
    changed_at = 5  # the token "left" (position 0 is BOS)
    changed = tokens.clone()
    changed[0, changed_at] = 4 if tokens[0, changed_at] != 4 else 5  # another word
    n_words = tokens.shape[1] - 2

    # Forward: target position p predicts token p + 1 from tokens 0..p.
    before, after = (token_log_probs(model, images, t, "left_to_right")[0] for t in (tokens, changed))
    torch.testing.assert_close(before[: changed_at - 1], after[: changed_at - 1])  # tokens 1..t
    assert not torch.allclose(before[changed_at:], after[changed_at:])  # the later tokens do see it

    # Backward: target position p predicts word n - p from the words after it; word i sits at p = n - i.
    before, after = (token_log_probs(model, images, t, "right_to_left")[0] for t in (tokens, changed))
    unaffected = n_words - changed_at  # words changed_at + 1 .. n
    torch.testing.assert_close(before[:unaffected], after[:unaffected])
    assert not torch.allclose(before[unaffected + 1 :], after[unaffected + 1 :])


@torch.no_grad()
def test_cached_visual_tokens_score_like_recomputed_ones(shapes):
    splits, tokenizer = shapes
    test = splits["test"]
    model = tiny_model(tokenizer)
    gallery = visual_tokens(model, test.images)
    captions = tokenizer.encode(test.captions[:4])
    candidates = torch.tensor([[0, 3, 5], [1, 2, 11], [7, 7, 0], [4, 9, 10]])
    cached = pair_scores(model, gallery, captions, candidates)
    for q in range(len(candidates)):
        fresh = visual_tokens(model, test.images[candidates[q].numpy()])
        recomputed = pair_scores(model, fresh, captions[q : q + 1], torch.arange(3)[None])
        torch.testing.assert_close(cached[q : q + 1], recomputed, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("candidates", ["everyone", "a few each"])
@torch.no_grad()
def test_gallery_keys_values_follow_the_weights(shapes, candidates):
    splits, tokenizer = shapes
    test = splits["test"]
    model = tiny_model(tokenizer)
    gallery = visual_tokens(model, test.images)
    captions = tokenizer.encode(test.captions[:2])
    if candidates == "everyone":
        candidates = torch.arange(len(test)).expand(2, len(test))
    else:  # a Fast+Slow query's top K reads the same kept keys and values
        candidates = torch.tensor([[4, 0, 9], [2, 2, 7]])
    before = pair_scores(model, gallery, captions, candidates)  # projects and keeps the gallery's keys
    model.decoders["left_to_right"].layers[0].cross_key_value.weight.mul_(3.0)
    after = pair_scores(model, gallery, captions, candidates)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, pair_scores(model, visual_tokens(model, test.images), captions, candidates))


def test_the_compiled_query_path_scores_as_the_models_do(shapes):
    from fastslow.bench import QueryPath
    from fastslow.models.dual_encoder import DualEncoder

    splits, tokenizer = shapes
    test = splits["test"]
    slow = tiny_model(tokenizer)
    fast = DualEncoder(tokenizer.vocab_size, DualEncoderConfig(encoder=TINY_ENCODER, embed_dim=16), IMAGE_SIZE).eval()
    gallery = visual_tokens(slow, test.images)
    eager, compiled = (QueryPath(fast, None, slow, gallery, compiled=c) for c in (False, True))
    captions = tokenizer.encode(test.captions[:1])
    candidates = torch.tensor([[4, 0, 9, 2, 7]])
    # One query against its candidates, as the timers run it (compiling costs seconds a shape).
    with torch.inference_mode():
        torch.testing.assert_close(compiled.slow_scores(captions, candidates), eager.slow_scores(captions, candidates))
        torch.testing.assert_close(compiled._embed_texts(captions), eager._embed_texts(captions))


def test_a_gallery_made_in_inference_mode_scores_as_one_made_without_grad(shapes):
    splits, tokenizer = shapes
    test = splits["test"]
    model = tiny_model(tokenizer)
    captions = tokenizer.encode(test.captions[:2])
    candidates = torch.tensor([[4, 0, 9], [2, 2, 7]])
    expected = pair_scores(model, visual_tokens(model, test.images), captions, candidates)
    with torch.inference_mode():  # its tensors keep no version counter
        scores = pair_scores(model, visual_tokens(model, test.images), captions, candidates)
    torch.testing.assert_close(scores, expected)


@pytest.mark.parametrize("objective", OBJECTIVES)
@torch.no_grad()
def test_a_batch_of_candidates_scores_like_one_at_a_time(shapes, objective):
    splits, tokenizer = shapes
    test = splits["test"]
    model = tiny_model(tokenizer, objective=objective)
    gallery = visual_tokens(model, test.images)
    captions = tokenizer.encode(test.captions[:3])
    generator = torch.Generator().manual_seed(0)
    per_query = torch.stack([torch.randperm(len(test), generator=generator)[:4] for _ in range(3)])
    whole_gallery = torch.arange(6).expand(3, 6)
    for candidates in (per_query, whole_gallery):  # the per-pair path and the shared-candidates path
        batched = pair_scores(model, gallery, captions, candidates, batch_pairs=4)
        one_by_one = torch.tensor(
            [[pair_scores(model, gallery, captions[q : q + 1], candidates[q : q + 1, k : k + 1]).item()
              for k in range(candidates.shape[1])] for q in range(len(candidates))]
        )
        torch.testing.assert_close(batched, one_by_one, rtol=1e-4, atol=1e-4)


def test_bidirectional_score_is_the_sum_of_mean_token_log_probs(shapes):
    splits, tokenizer = shapes
    model = tiny_model(tokenizer)
    images, tokens = splits["test"].images[:2], tokenizer.encode(splits["test"].captions[:2])
    with torch.no_grad():
        predicted = tokens.ne(0).sum(1) - 1  # the words and EOS
        expected = sum(
            (token_log_probs(model, images, tokens, d) * teacher_forcing(tokens, d)[1].ne(0)).sum(1) / predicted
            for d in ("left_to_right", "right_to_left")
        )
        scores = pair_scores(model, visual_tokens(model, images), tokens, torch.arange(2).expand(2, 2))
    torch.testing.assert_close(scores.diagonal(), expected, rtol=1e-4, atol=1e-4)


def test_itm_negatives_prefer_the_twin_in_the_batch():
    twin = np.array([1, 0, -1, 4, 3, -1])
    image_index = torch.tensor([3, 0, 4, 1, 2])
    negatives = itm_negatives(image_index, twin, torch.Generator().manual_seed(0))
    assert negatives.shape == (5, 2)
    assert negatives[[0, 1, 2, 3], 0].tolist() == [2, 3, 0, 1]  # twins 3<->4 and 0<->1
    assert (negatives != torch.arange(5)[:, None]).all()  # never the pair's own caption


def test_keep_twins_together_pairs_each_twin_with_its_partner():
    twin = np.array([1, 0, -1, 4, 3, -1, 7, 6])
    order = keep_twins_together(np.random.default_rng(0).permutation(8), twin)
    assert sorted(order.tolist()) == list(range(8))
    position = {int(image): p for p, image in enumerate(order)}
    assert all(abs(position[i] - position[int(twin[i])]) == 1 for i in range(8) if twin[i] >= 0)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_trains_a_step(shapes, objective):
    splits, tokenizer = shapes
    train = splits["train"]
    tokens = tokenizer.encode(train.captions)
    model = tiny_model(tokenizer, objective=objective).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = PairBatches(train, tokens, batch_size=8, seed=0, epoch=0)
    batches.order = keep_twins_together(batches.order, train.twin)
    loss_fn = losses.cross_attention_loss(train.twin)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    output = loss_fn(model, next(iter(batches)), 0.0)
    loss = output[0] if isinstance(output, tuple) else output
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    changed = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert any(k.startswith("image_tower") for k in changed) and any(k.startswith("decoders") for k in changed)


def test_a_frozen_tower_keeps_its_weights_and_statistics(shapes):
    splits, tokenizer = shapes
    train = splits["train"]
    model = tiny_model(tokenizer, train_tower=False).train()
    assert not model.image_tower.training and model.decoders.training
    before = {k: v.clone() for k, v in model.image_tower.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, _ = losses.cross_attention_loss(train.twin)(model, next(iter(PairBatches(train, tokenizer.encode(train.captions), 8, 0, 0))), 0.0)
    loss.backward()
    optimizer.step()
    for name, value in model.image_tower.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_attention_maps_cover_the_grid(shapes):
    splits, tokenizer = shapes
    model = tiny_model(tokenizer, upsample_steps=1)
    tokens = tokenizer.encode(splits["test"].captions[:1])[0]
    maps = cross_attention_maps(model, splits["test"].images[:1], tokens)
    assert maps.shape == (TINY.layers, int(tokens.ne(0).sum()) - 1, 4, 4)
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(maps.shape[:2]))


def tiny_study_config(**cross):
    cfg = make_config("smoke", device="cpu")
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, n_train=64, n_val=16, n_test=16),
        dual=DualEncoderConfig(encoder=TINY_ENCODER, embed_dim=16),
        train_dual=TrainConfig(epochs=1, batch_size=16),
        cross=dataclasses.replace(TINY, validation_images=8, **cross),
        train_cross=TrainConfig(epochs=1, batch_size=16),
    )


def test_each_variant_trains_once_and_then_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSLOW_CACHE", str(tmp_path))
    cfg = tiny_study_config()
    data = stages.load_study(cfg)
    first = stages.train_or_load_cross_attention(cfg, data, upsample_steps=0)
    again = stages.train_or_load_cross_attention(cfg, data, upsample_steps=0)
    other = stages.train_or_load_cross_attention(cfg, data, upsample_steps=0, objective="forward")
    key = stages.cross_attention_key(cfg, upsample_steps=0)
    weights = cache.artifact_checksum("cross_attention", key)
    assert first.config_hash == again.config_hash == config_hash({"config": key, "weights": weights})
    assert other.config_hash != first.config_hash and other.model.directions == ("left_to_right",)
    assert len(list(tmp_path.glob("cross_attention-*.pt"))) == 2
    for name, value in first.model.state_dict().items():
        torch.testing.assert_close(value, again.model.state_dict()[name])


def test_the_tower_can_start_from_the_dual_encoders(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSLOW_CACHE", str(tmp_path))
    cfg = tiny_study_config(tower_init="dual_encoder")
    untrained = dataclasses.replace(cfg, train_cross=TrainConfig(epochs=0))
    data = stages.load_study(cfg)
    slow = stages.train_or_load_cross_attention(untrained, data)
    fast = stages.train_or_load_dual_encoder(cfg, data)
    for name, value in fast.model.image_tower.state_dict().items():
        torch.testing.assert_close(slow.model.image_tower.state_dict()[name], value)
    # The Slow model's cache key follows the dual encoder it starts from.
    other_fast = dataclasses.replace(cfg, train_dual=TrainConfig(epochs=2, batch_size=16))
    assert config_hash(stages.cross_attention_key(cfg)) != config_hash(stages.cross_attention_key(other_fast))
    assert "tower" not in stages.cross_attention_key(cfg, tower_init="scratch")


def test_a_trained_model_depends_on_its_config_not_on_what_ran_before(tmp_path, monkeypatch):
    cfg = tiny_study_config(tower_init="scratch", train_tower=True)
    data = stages.load_study(cfg)
    weights = []
    for run, draws in enumerate((0, 1000)):
        monkeypatch.setenv("FASTSLOW_CACHE", str(tmp_path / f"cache{run}"))  # trained afresh both times
        torch.rand(draws)  # other random draws in between, as a notebook makes
        torch.manual_seed(run)
        weights.append(stages.train_or_load_dual_encoder(cfg, data).model.state_dict())
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=0)
