"""Caption decoders on MiniLM's word pieces: the compact vocabulary, the tied word-piece table, the
look-alike term of the captioning loss, and the prior-corrected captioning scores."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastslow import losses
from fastslow.config import CrossAttentionConfig, EncoderConfig
from fastslow.data.shapes import make_shapes
from fastslow.data.text import SpecialPieces, WordPieceVocabulary, WordTokenizer
from fastslow.inputs import (
    FEATURE_CHANNELS,
    FEATURE_STRIDES,
    MAX_CAPTION_TOKENS,
    POOLED_DIM,
    FeatureImages,
    images_to_tensor,
    model_input,
)
from fastslow.models.cross_attention import (
    CrossAttentionModel,
    TiedWordPieces,
    pair_scores,
    visual_tokens,
)
from fastslow.models.pretrained import minilm_word_table, text_backbone
from fastslow.scoring import cross_attention_scores, mean_input
from test_cross_attention import token_log_probs

BERT_SPECIAL = SpecialPieces(pad=0, cls=101, sep=102, unk=100)
IMAGE_SIZE = 224  # EfficientNet-Lite0's maps are then 28x28, 14x14 and 7x7
WORD_PIECE_MODEL = CrossAttentionConfig(
    encoder=EncoderConfig(backbone="pretrained", max_caption_tokens=MAX_CAPTION_TOKENS),
    tower_init="scratch",
    width=32,
    layers=2,
    heads=2,
)
CAPTIONS = [
    "a black dog runs across the green grass .",
    "two children are playing football in a park",
    "a man in a red jacket climbs a snowy mountain",
    "a woman sits on a bench reading a newspaper",
]


def random_features(n: int, seed: int = 0) -> FeatureImages:
    """Float16 features shaped like EfficientNet-Lite0's for 224-pixel images."""
    generator = torch.Generator().manual_seed(seed)
    maps = [
        torch.randn(n, channels, IMAGE_SIZE // stride, IMAGE_SIZE // stride, generator=generator)
        for channels, stride in zip(FEATURE_CHANNELS, FEATURE_STRIDES)
    ]
    return FeatureImages([m.half() for m in maps], torch.randn(n, POOLED_DIM, generator=generator))


@pytest.fixture(scope="module")
def minilm():
    """MiniLM's ids of :data:`CAPTIONS`, the vocabulary fitted on them and its word table."""
    tokenizer = text_backbone().tokenizer
    ids = tokenizer(CAPTIONS, padding=True, return_tensors="pt")["input_ids"]
    vocabulary = WordPieceVocabulary.fit(ids, SpecialPieces.of(tokenizer))
    return ids, vocabulary, minilm_word_table(vocabulary.minilm_ids)


def word_piece_model(minilm, seed: int = 0, **overrides) -> CrossAttentionModel:
    _, vocabulary, table = minilm
    torch.manual_seed(seed)
    config = dataclasses.replace(WORD_PIECE_MODEL, **overrides)
    return CrossAttentionModel(vocabulary.vocab_size, config, IMAGE_SIZE, word_table=table).eval()


def test_word_pieces_encode_in_the_word_tokenizer_layout():
    minilm_ids = torch.tensor([[101, 2000, 3000, 102, 0, 0], [101, 3000, 1000, 4000, 2000, 102]])
    vocabulary = WordPieceVocabulary.fit(minilm_ids[:1], BERT_SPECIAL)
    assert vocabulary.vocab_size == 6
    assert vocabulary.minilm_ids.tolist() == [0, 101, 102, 100, 2000, 3000]  # specials, then by id
    encoded = vocabulary.encode(minilm_ids)
    assert encoded.dtype == torch.int64 and encoded.shape == minilm_ids.shape
    # BOS first, EOS right after the last piece, padding after it; unseen pieces are UNK.
    assert encoded.tolist() == [[1, 4, 5, 2, 0, 0], [1, 5, 3, 3, 4, 2]]
    assert vocabulary.encode(torch.tensor([[101, 100, 99999, 102]])).tolist() == [[1, 3, 3, 2]]
    fitted_twice = WordPieceVocabulary.fit(minilm_ids.flip(0), BERT_SPECIAL, min_count=2)
    assert fitted_twice.minilm_ids.tolist() == [0, 101, 102, 100, 2000, 3000]
    with pytest.raises(ValueError, match="CLS"):
        vocabulary.encode(torch.tensor([[2000, 102]]))


def test_word_pieces_of_real_captions_read_back(minilm):
    ids, vocabulary, _ = minilm
    tokenizer = text_backbone().tokenizer
    encoded = vocabulary.encode(ids)
    lengths = ids.ne(0).sum(1)
    assert torch.equal(encoded.ne(WordTokenizer.pad_id).sum(1), lengths)
    assert (encoded[:, 0] == WordTokenizer.bos_id).all()
    assert (encoded.gather(1, lengths[:, None] - 1) == WordTokenizer.eos_id).all()
    assert torch.equal(vocabulary.minilm_ids[encoded], ids)  # every piece of the fit set is kept
    assert vocabulary.decode(encoded[0], tokenizer) == "a black dog runs across the green grass."


def test_every_decoder_starts_from_minilm_word_pieces_of_its_own(minilm):
    _, vocabulary, _ = minilm
    model = word_piece_model(minilm)
    minilm_rows = text_backbone().model.embeddings.word_embeddings.weight[vocabulary.minilm_ids]
    tables = [decoder.head.table for decoder in model.decoders.values()]
    assert len(tables) == 2
    for table in tables:
        assert table.requires_grad and table.shape == (vocabulary.vocab_size, 384)
        assert torch.equal(table, minilm_rows)
    assert tables[0].data_ptr() != tables[1].data_ptr()


@torch.no_grad()
def test_no_future_word_piece_leaks_into_either_decoder(minilm):
    ids, vocabulary, _ = minilm
    model = word_piece_model(minilm)
    images = random_features(1)
    tokens = vocabulary.encode(ids[:1])[:, : int(ids[0].ne(0).sum())]  # BOS + pieces + EOS
    changed_at = 4
    changed = tokens.clone()
    changed[0, changed_at] = 5 if tokens[0, changed_at] != 5 else 6  # another word piece
    n_pieces = tokens.shape[1] - 2

    def log_probs(caption: torch.Tensor, direction: str) -> torch.Tensor:
        return token_log_probs(model, images, caption, direction)[0]

    # Forward: target position p predicts token p + 1 from tokens 0..p.
    before, after = (log_probs(t, "left_to_right") for t in (tokens, changed))
    torch.testing.assert_close(before[: changed_at - 1], after[: changed_at - 1])
    assert not torch.allclose(before[changed_at:], after[changed_at:])

    # Backward: target position p predicts piece n - p from the pieces after it.
    before, after = (log_probs(t, "right_to_left") for t in (tokens, changed))
    unaffected = n_pieces - changed_at
    torch.testing.assert_close(before[:unaffected], after[:unaffected])
    assert not torch.allclose(before[unaffected + 1 :], after[unaffected + 1 :])


def look_alike_batch(minilm, negatives_per_caption: int = 2) -> dict:
    ids, vocabulary, _ = minilm
    pairs = len(ids)
    return {
        "images": model_input(random_features(pairs, seed=1)),
        "tokens": vocabulary.encode(ids),
        "negative_images": model_input(random_features(pairs * negatives_per_caption, seed=2)),
        "image_index": torch.arange(pairs),
    }


def test_the_look_alike_term_is_the_listwise_cross_entropy_of_the_pair_scores(minilm):
    model = word_piece_model(minilm)
    batch = look_alike_batch(minilm)
    no_twins = np.full(len(batch["tokens"]), -1)
    loss, extras = losses.cross_attention_loss(no_twins, negative_weight=0.5)(model, batch, 0.0)
    assert torch.isfinite(loss)
    assert set(extras) == {"nll_left_to_right", "nll_right_to_left", "look_alike"}
    without = {k: v for k, v in batch.items() if k != "negative_images"}
    nll, nll_extras = losses.cross_attention_loss(no_twins)(model, without, 0.0)
    assert "look_alike" not in nll_extras
    torch.testing.assert_close(loss, nll + 0.5 * extras["look_alike"])

    # The same term from the scoring path: caption b against image b, then its look-alikes.
    pairs, per_caption = len(batch["tokens"]), 2
    gallery = torch.cat([visual_tokens(model, batch[key]) for key in ("images", "negative_images")])
    own = torch.arange(pairs)[:, None]
    candidates = torch.cat([own, pairs + own * per_caption + torch.arange(per_caption)], dim=1)
    scores = pair_scores(model, gallery, batch["tokens"], candidates)
    expected = F.cross_entropy(scores, torch.zeros(pairs, dtype=torch.long))
    assert abs(extras["look_alike"] - expected.item()) < 1e-4


def test_the_look_alike_term_trains_the_word_tables_and_weighs_nothing_at_zero(minilm):
    model = word_piece_model(minilm).train()
    batch = look_alike_batch(minilm)
    no_twins = np.full(len(batch["tokens"]), -1)
    tokens = batch["tokens"]
    keys_values = model.visual_keys_values(model.encode_images(batch["images"]))
    own = torch.arange(len(tokens))
    own_scores = model.score_pairs(tokens, keys_values, own, own[:, None])[:, 0]
    term = losses.look_alike_loss(model, tokens, own_scores, batch["negative_images"])
    assert torch.isfinite(term)
    term.backward()
    for decoder in model.decoders.values():
        assert decoder.head.table.grad is not None and decoder.head.table.grad.abs().sum() > 0

    model.zero_grad()
    unweighted = losses.cross_attention_loss(no_twins, negative_weight=0.0)
    weighted_nothing, extras = unweighted(model, batch, 0.0)
    without = {k: v for k, v in batch.items() if k != "negative_images"}
    nll, _ = losses.cross_attention_loss(no_twins)(model, without, 0.0)
    assert extras["look_alike"] > 0  # still logged
    torch.testing.assert_close(weighted_nothing, nll, rtol=0, atol=0)


def test_look_alikes_in_pixels_train_a_shapes_model():
    splits = make_shapes(8, 4, 4, image_size=32, captions_per_image=1, seed=0)
    train = splits["train"]
    tokenizer = WordTokenizer.fit(train.captions)
    encoder = EncoderConfig(channels=(8, 8, 16, 16), text_width=16, text_layers=1, heads=2)
    config = CrossAttentionConfig(encoder=encoder, tower_init="scratch", width=16, heads=2)
    model = CrossAttentionModel(tokenizer.vocab_size, config, 32)
    batch = {
        "images": images_to_tensor(train.images[:4]),
        "tokens": tokenizer.encode(train.captions[:4]),
        "negative_images": images_to_tensor(train.images[[4, 5, 6, 7, 5, 6, 7, 4]]),
        "image_index": torch.arange(4),
    }
    loss, extras = losses.cross_attention_loss(train.twin)(model, batch, 0.0)
    assert torch.isfinite(loss) and np.isfinite(extras["look_alike"])


@torch.no_grad()
def test_scoring_reuses_the_table_projection_and_scores_like_training(minilm):
    ids, vocabulary, _ = minilm
    model = word_piece_model(minilm)
    tokens = vocabulary.encode(ids)
    gallery_features = random_features(3)
    everyone = torch.arange(3).expand(len(tokens), 3)

    def training_mode_scores() -> torch.Tensor:
        with torch.enable_grad():
            model.train()
            visual = model.encode_images(model_input(gallery_features))
            captions = torch.arange(len(tokens))[None]  # every caption against each image
            keys_values = model.visual_keys_values(visual)
            scores = model.score_pairs(tokens, keys_values, torch.arange(3), captions).T
            model.eval()
        assert scores.requires_grad
        return scores.detach()

    scored = pair_scores(model, visual_tokens(model, gallery_features), tokens, everyone)
    torch.testing.assert_close(scored, training_mode_scores(), rtol=0, atol=1e-5)
    head = model.decoders["left_to_right"].head
    assert isinstance(head, TiedWordPieces)
    cached = head.output_weight()
    assert head.output_weight() is cached  # computed once while scoring
    states = torch.randn(5, WORD_PIECE_MODEL.width)
    as_written = head.output_projection(states) @ head.table.T + head.bias
    torch.testing.assert_close(head(states), as_written, rtol=0, atol=1e-5)

    head.table.mul_(2.0)  # a weight changed in place: the projection is computed again
    assert head.output_weight() is not cached
    rescored = pair_scores(model, visual_tokens(model, gallery_features), tokens, everyone)
    assert not torch.allclose(rescored, scored)
    torch.testing.assert_close(rescored, training_mode_scores(), rtol=0, atol=1e-5)


def ranks(scores: torch.Tensor, dim: int) -> torch.Tensor:
    return scores.argsort(dim=dim, descending=True)


@pytest.mark.parametrize("objective", ["bidirectional", "forward"])
@torch.no_grad()
def test_the_caption_prior_reorders_captions_but_not_images(minilm, objective):
    ids, vocabulary, _ = minilm
    model = word_piece_model(minilm, objective=objective)
    tokens = vocabulary.encode(ids)
    gallery = random_features(6, seed=3)
    everyone = torch.arange(6).expand(len(tokens), 6)
    plain = pair_scores(model, visual_tokens(model, gallery), tokens, everyone)
    corrected = cross_attention_scores(model, gallery, tokens, "cpu")
    assert torch.equal(ranks(corrected, 1), ranks(plain, 1))  # text-to-image: unchanged
    assert not torch.equal(ranks(corrected, 0), ranks(plain, 0))  # image-to-text: may change
    mean_maps = [m.float().mean(0, keepdim=True) for m in gallery.maps]
    reference = visual_tokens(model, FeatureImages(mean_maps, gallery.pooled.mean(0, keepdim=True)))
    prior = pair_scores(model, reference, tokens, torch.zeros(len(tokens), 1, dtype=torch.long))
    torch.testing.assert_close(plain - corrected, prior.expand_as(plain), rtol=0, atol=1e-5)


@torch.no_grad()
def test_pixel_galleries_are_corrected_by_their_exact_mean_image_and_itm_not_at_all():
    splits = make_shapes(4, 4, 6, image_size=32, captions_per_image=1, seed=0)
    test = splits["test"]
    mean_of_normalised = images_to_tensor(test.images).mean(0, keepdim=True)
    torch.testing.assert_close(images_to_tensor(mean_input(test.images)), mean_of_normalised)
    tokenizer = WordTokenizer.fit(test.captions)
    encoder = EncoderConfig(channels=(8, 8, 16, 16), text_width=16, text_layers=1, heads=2)
    tokens = tokenizer.encode(test.captions)
    everyone = torch.arange(len(test)).expand(len(tokens), len(test))
    for objective in ("bidirectional", "itm"):
        config = CrossAttentionConfig(
            encoder=encoder, tower_init="scratch", width=16, heads=2, objective=objective
        )
        torch.manual_seed(0)
        model = CrossAttentionModel(tokenizer.vocab_size, config, 32)
        plain = pair_scores(model, visual_tokens(model, test.images), tokens, everyone)
        corrected = cross_attention_scores(model, test.images, tokens, "cpu")
        if objective == "itm":
            assert torch.equal(corrected, plain)
        else:
            assert torch.equal(ranks(corrected, 1), ranks(plain, 1))
            assert not torch.allclose(corrected, plain)
