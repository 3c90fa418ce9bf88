"""The models on clips: a time axis through the towers, temporal pooling, spatio-temporal tokens."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fastslow import evaluation, stages
from fastslow.config import CrossAttentionConfig, DataConfig, DualEncoderConfig, EncoderConfig, TrainConfig, make_config
from fastslow.models.cross_attention import CrossAttentionModel, pair_scores, visual_tokens
from fastslow.models.dual_encoder import DualEncoder, TemporalPooling, embed_images
from fastslow.inputs import frames_per_item, images_to_tensor, model_input
from fastslow.models.encoders import frozen_tower_maps

SIZE, FRAMES = 32, 4
TINY_ENCODER = EncoderConfig(channels=(8, 8, 16, 16), text_width=16, text_layers=1, heads=2)
TINY_CROSS = CrossAttentionConfig(encoder=TINY_ENCODER, tower_init="scratch", train_tower=True, width=16, heads=2)


@pytest.fixture(scope="module")
def clips() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (5, FRAMES, SIZE, SIZE, 3), dtype=np.uint8)


def test_clips_keep_their_time_axis_and_each_frame_is_an_image(clips):
    tensor = images_to_tensor(clips)
    assert tensor.shape == (5, FRAMES, 3, SIZE, SIZE)
    torch.testing.assert_close(tensor[:, 2], images_to_tensor(clips[:, 2]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="clips"):
        images_to_tensor(clips[0, 0])


@pytest.mark.parametrize("temporal", ["mean", "transformer"])
def test_a_clip_embeds_to_one_unit_vector(clips, temporal):
    torch.manual_seed(0)
    model = DualEncoder(40, DualEncoderConfig(encoder=TINY_ENCODER, embed_dim=16, temporal=temporal), SIZE, FRAMES)
    embeddings = embed_images(model, clips)
    assert embeddings.shape == (5, 16)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(5))
    # Images skip the temporal pooling: the same model embeds single frames too.
    assert embed_images(model, clips[:, 0]).shape == (5, 16)


def test_mean_pooling_ignores_frame_order_and_the_temporal_transformer_does_not(clips):
    shuffled = [2, 0, 3, 1]
    torch.manual_seed(0)
    mean = DualEncoder(40, DualEncoderConfig(encoder=TINY_ENCODER, embed_dim=16), SIZE, FRAMES)
    torch.testing.assert_close(embed_images(mean, clips[:, shuffled]), embed_images(mean, clips))
    # An untrained tower embeds noise frames almost alike, so the pooling is tested on distinct frames.
    frames = torch.randn(5, FRAMES, 16)
    transformer = TemporalPooling("transformer", 16, FRAMES, heads=2).eval()
    with torch.no_grad():
        assert (transformer(frames[:, shuffled]) - transformer(frames)).abs().max() > 1e-3
        torch.testing.assert_close(TemporalPooling("mean", 16, FRAMES, heads=2)(frames[:, shuffled]), frames.mean(1))


def test_a_mean_pooled_model_has_no_temporal_weights():
    mean = DualEncoder(40, DualEncoderConfig(encoder=TINY_ENCODER, embed_dim=16), SIZE, FRAMES)
    image = DualEncoder(40, DualEncoderConfig(encoder=TINY_ENCODER, embed_dim=16), SIZE)
    assert mean.state_dict().keys() == image.state_dict().keys()
    with pytest.raises(ValueError, match="temporal pooling"):
        DualEncoder(40, DualEncoderConfig(encoder=TINY_ENCODER, temporal="lstm"), SIZE, FRAMES)


def test_cross_attention_sees_every_cell_of_every_frame(clips):
    torch.manual_seed(0)
    model = CrossAttentionModel(40, dataclasses.replace(TINY_CROSS, upsample_steps=1), SIZE, FRAMES)
    h, w = model.grid_shape
    gallery = visual_tokens(model, clips)
    assert gallery.shape == (5, FRAMES * h * w, TINY_CROSS.width)
    assert visual_tokens(model, clips[:, 0]).shape == (5, h * w, TINY_CROSS.width)
    # Frame t's tokens are the t-th block: changing only the last frame changes only its block.
    changed = clips.copy()
    changed[:, -1] = 255 - changed[:, -1]
    difference = (visual_tokens(model, changed) - gallery).abs().amax(dim=(0, 2)).view(FRAMES, h * w)
    assert difference[:-1].max() == 0 and difference[-1].min() > 0
    with pytest.raises(ValueError, match="frames"):
        CrossAttentionModel(40, TINY_CROSS, SIZE).encode_images(images_to_tensor(clips))


def test_clip_pair_scores_batched_equal_one_at_a_time(clips):
    torch.manual_seed(0)
    model = CrossAttentionModel(40, TINY_CROSS, SIZE, FRAMES)
    gallery = visual_tokens(model, clips)
    tokens = torch.randint(3, 40, (3, 9))
    tokens[:, 0], tokens[:, -1], tokens[2, 6:] = 1, 2, 0
    tokens[2, 5] = 2
    everyone = torch.arange(len(clips)).expand(3, -1)
    batched = pair_scores(model, gallery, tokens, everyone)
    single = torch.tensor([[pair_scores(model, gallery, tokens[q : q + 1], torch.tensor([[i]])).item() for i in range(len(clips))] for q in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("items", ["clips", "images"])
def test_a_frozen_towers_maps_give_the_visual_tokens_its_pixels_give(clips, items):
    pixels = clips if items == "clips" else clips[:, 0]
    torch.manual_seed(0)
    model = CrossAttentionModel(40, dataclasses.replace(TINY_CROSS, train_tower=False, upsample_steps=1), SIZE, FRAMES)
    maps = frozen_tower_maps(model.image_tower, pixels, batch_size=8)
    assert len(maps) == len(pixels) and frames_per_item(maps) == frames_per_item(pixels)
    order = [3, 0, 4]
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval().encode_images(model_input(maps[order])), model.encode_images(model_input(pixels[order])),
            rtol=1e-5, atol=1e-6,
        )
        # Caption scores read the tokens; a gallery of maps scores as one of pixels does.
        torch.testing.assert_close(visual_tokens(model, maps), visual_tokens(model, pixels), rtol=1e-5, atol=1e-6)
    assert frozen_tower_maps(model.image_tower, pixels, max_bytes=1000) is None


def test_a_slow_model_that_fine_tunes_its_tower_refuses_frozen_maps(clips):
    model = CrossAttentionModel(40, TINY_CROSS, SIZE, FRAMES)
    maps = frozen_tower_maps(model.image_tower, clips)
    with pytest.raises(ValueError, match="fine-tunes"):
        model.encode_images(maps)


def tiny_video_config():
    cfg = make_config("smoke", dataset="shapes-video", device="cpu")
    return dataclasses.replace(
        cfg,
        data=DataConfig(dataset="shapes-video", n_train=32, n_val=8, n_test=8, image_size=SIZE, frames=FRAMES, captions_per_image=2),
        dual=DualEncoderConfig(encoder=TINY_ENCODER, embed_dim=16, temporal="transformer"),
        train_dual=TrainConfig(epochs=1, batch_size=16),
        cross=dataclasses.replace(TINY_CROSS, tower_init="dual_encoder", train_tower=False, validation_images=8),
        train_cross=TrainConfig(epochs=1, batch_size=16),
    )


def test_the_stages_train_on_shapes_video(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSLOW_CACHE", str(tmp_path))
    cfg = tiny_video_config()
    data = stages.load_study(cfg)
    assert data.test.frames == FRAMES
    fast = stages.train_or_load_dual_encoder(cfg, data)
    slow = stages.train_or_load_cross_attention(cfg, data)
    # Its frozen tower's maps were computed once; trained on the pixels instead, it is the same model.
    monkeypatch.setenv("FASTSLOW_CACHE", str(tmp_path / "pixels"))
    monkeypatch.setattr(stages, "frozen_tower_maps", lambda tower, images: None)
    on_pixels = stages.train_or_load_cross_attention(cfg, data)
    for name, weights in slow.model.state_dict().items():
        torch.testing.assert_close(weights, on_pixels.model.state_dict()[name], rtol=1e-4, atol=1e-5)
    assert len(fast.history["epochs"]) == len(slow.history["epochs"]) == 1
    fast_scores = evaluation.headline_fast_scores(fast.model, data, cfg.device)
    slow_scores = evaluation.headline_slow_scores(cfg, data, slow)
    assert fast_scores.shape == slow_scores.shape == (len(data.headline_queries()), len(data.test))
    assert torch.isfinite(slow_scores).all()


def test_video_datasets_get_the_profiles_video_sizes():
    images, clips = make_config("quick"), make_config("quick", dataset="shapes-video")
    assert clips.data.n_train < images.data.n_train and clips.data.dataset == "shapes-video"
    assert images.data.n_train == 6000 and images.cross.upsample_steps == CrossAttentionConfig().upsample_steps
    with pytest.raises(ValueError, match="pretrained video"):
        make_config("smoke", dataset="shapes-video", backbone="pretrained")


def test_twin_negative_batches_pair_each_full_caption_with_its_twin():
    from fastslow.batches import TwinNegativeBatches
    from fastslow.data.text import WordTokenizer
    from fastslow.data.video import make_shapes_video

    train = make_shapes_video(40, 4, 4, image_size=32, frames=3, seed=1)["train"]
    tokens = WordTokenizer.fit(train.captions).encode(train.captions)
    batches = TwinNegativeBatches(train, tokens, batch_size=8, seed=0, epoch=2)
    full = np.array([train.caption_kind[c] == "full" for c in batches.caption_of])
    with_twin = (train.twin >= 0) & full
    assert with_twin.any() and (~with_twin).any()
    assert (batches.negative_of[with_twin] == train.twin[with_twin]).all()
    assert (batches.negative_of != np.arange(len(train))).all()  # never the pair's own clip
    again = TwinNegativeBatches(train, tokens, batch_size=8, seed=0, epoch=2)
    assert (again.negative_of == batches.negative_of).all()  # deterministic in (seed, epoch)
    batch = next(iter(batches))
    negatives = batches.negative_of[batch["image_index"].numpy()]
    assert torch.equal(batch["negative_images"], model_input(train.images[negatives]))


def test_only_clips_train_their_slow_model_on_twins_and_image_keys_stay_as_they_were():
    from fastslow.config import CrossAttentionConfig, config_hash, make_config, to_jsonable

    video = make_config("quick", dataset="shapes-video").cross
    assert video.twin_negatives and video.negative_weight == 3.0
    assert not make_config("quick", dataset="shapes").cross.twin_negatives
    # A setting added after the image models were cached enters their keys only when set.
    assert "twin_negatives" not in to_jsonable(CrossAttentionConfig())
    on = CrossAttentionConfig(twin_negatives=True)
    assert to_jsonable(on)["twin_negatives"] and config_hash(on) != config_hash(CrossAttentionConfig())


def test_clips_are_timed_as_written_while_images_are_timed_compiled():
    from fastslow.config import make_config

    assert not make_config("quick", dataset="shapes-video").rerank.compiled_queries
    assert make_config("quick", dataset="shapes").rerank.compiled_queries
    assert not make_config("smoke", dataset="shapes").rerank.compiled_queries
