"""The package helpers behind notebooks 01, 02, 06 and 07's toy examples, verdict sentences (06: the
order test against chance), figures and the papers' numbers."""

from __future__ import annotations

import dataclasses

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from fastslow import analysis, claims, plots, results, summary


def preferences(flags: list[bool]) -> pd.DataFrame:
    return pd.DataFrame({"prefers_own": flags, "kind": ["attribute_swap"] * len(flags)})


def test_bag_of_words_oracle_never_prefers_the_right_twin_of_a_toy_pair():
    toy = analysis.twin_pair_split(
        captions=["a red circle left of a blue square", "a red circle and a blue square"],
        twin_captions=["a blue circle left of a red square", "a blue circle and a red square"])
    assert list(toy.twin) == [1, 0] and toy.num_captions == 4
    words = sorted({w for c in toy.captions for w in c.split()})
    scores = analysis.bag_of_words_oracle_scores(toy, np.arange(4), words)
    assert scores.shape == (4, 2)
    assert np.allclose(scores[[0, 1], 1], 1.0) and np.all(scores[[0, 1], 0] < 1.0)
    assert analysis.twin_preferences(scores, toy)["prefers_own"].sum() == 0


def test_twin_pair_split_needs_as_many_captions_on_each_side():
    with pytest.raises(ValueError, match="as many captions"):
        analysis.twin_pair_split(["a", "b"], ["c"])


def test_twin_share_interval_covers_the_share_and_is_empty_without_twins():
    share, low, high, n = analysis.twin_share_interval(preferences([True] * 70 + [False] * 30))
    assert (share, n) == (70.0, 100)
    assert low < 70.0 < high and high - low < 25
    assert analysis.twin_share_interval(preferences([]))[3] == 0


@pytest.mark.parametrize(("low", "high", "expected"), [
    (55.0, 70.0, "above chance"), (10.0, 45.0, "below chance"), (45.0, 55.0, "not distinguishable from chance")])
def test_against_chance_reads_the_interval(low, high, expected):
    assert analysis.against_chance(low, high) == expected


def test_retrieval_verdict_is_computed_from_the_ranks_and_the_twins():
    ranks = np.array([1] * 30 + [2] * 70)
    metrics = {"t2i": {"R@1": 30.0}, "ranks": {"t2i": ranks}}
    text = analysis.retrieval_verdict("fast", metrics, preferences([False] * 40), ms_per_query=1.234)
    assert text.startswith("fast: text-to-image R@1 30.0% (95% interval [")
    assert "over 100 queries, at 1.23 ms per query" in text
    assert "on 0.0% of 40 twin captions" in text and text.endswith("below chance (50%).")
    assert "not tested here" in analysis.retrieval_verdict("fast", metrics, preferences([]))


def test_every_method_of_the_study_has_its_own_colour():
    colours = list(plots.METHOD_COLOURS.values())
    assert len(set(colours)) == len(colours)
    assert plots.method_colour("no_such_method") not in colours


def test_speed_accuracy_panels_draw_one_panel_per_dataset():
    points = pd.DataFrame({"method": ["dual_encoder", "fast_slow", "fast_slow", "dual_encoder"],
                           "K": [None, 1, 10, None], "ms_per_query": [1.0, 2.0, 3.0, 5.0],
                           "R@1": [20.0, 20.0, 30.0, 10.0], "dataset": ["shapes"] * 3 + ["flickr8k"],
                           "gallery": [100, 100, 100, 50]})
    fig = plots.speed_accuracy_panels(points)
    assert [ax.get_title() for ax in fig.axes] == ["shapes", "flickr8k"]
    line = next(l for l in fig.axes[0].get_lines() if l.get_label() == "fast_slow")
    assert line.get_color() == plots.method_colour("fast_slow")
    empty = plots.speed_accuracy_panels(points.iloc[:0])
    assert len(empty.axes) == 1


def test_confused_pair_images_show_one_row_per_distinct_pair(tmp_path):
    toy = analysis.twin_pair_split(["a red circle"] * 2, ["a blue circle"] * 2)
    pairs = pd.DataFrame({"kind": ["attribute_swap"] * 2, "caption": ["a red circle"] * 2,
                          "image": [0, 0], "twin": [1, 1], "own_score": [0.2, 0.3],
                          "twin_score": [0.9, 0.8]})
    fig = plots.confused_pair_images(toy, pairs)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["right image\nscore 0.200", "twin, ranked above it\nscore 0.900"]


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSLOW_RESULTS", str(tmp_path))
    return tmp_path


def summary_row(method: str, r1: float, ms: float | None, notebook: str) -> dict:
    found = round(r1 * 4)
    ranks = np.array([1] * found + [2] * (400 - found))
    return {"notebook": notebook, "experiment": "headline", "method": method, "variant": "",
            "dataset": "shapes", "gallery": 100, "direction": "t2i", "K": None, "seed": 0,
            "run_seed": None, "R@1": r1, "R@1_lo": r1 - 2, "R@1_hi": r1 + 2, "R@5": r1, "R@10": r1,
            "MdR": 2.0, "queries": 400, "ms_per_query": ms, "ranks": ranks}


def test_paper_numbers_sit_beside_ours_and_ours_stay_blank_without_rows(root):
    results.record(results.run_dir("smoke-shapes"), [
        summary_row("dual_encoder", 20.0, 2.0, "02"), summary_row("cross_attention", 30.0, 300.0, "03")])
    table = claims.paper_numbers_table(summary.load_summaries(["smoke"])).set_index("claim")
    assert table.loc["RQ1", "ours: shapes"].startswith("+10.0 R@1 points [")
    assert table.loc["RQ1", "paper's number"] == ""  # the abstract states no number
    dcd = table.loc["RQ2-DCD"]
    speed = dcd[dcd["paper's number"] == "at least 129x faster inference"].iloc[0]
    assert speed["ours: shapes"] == "150x (student vs Slow teacher)"
    assert speed["quote"].startswith("“Encouragingly, we can speed up the inference at least 129")
    assert "RQ2-TFS" not in table.index  # the abstract states no distillation number
    assert table.loc["RQ3", "ours: shapes"] == ""  # notebook 05 did not run


def test_every_paper_number_quotes_a_claim_of_the_study():
    for entry in claims.PAPER_NUMBERS:
        assert entry.claim in claims.CLAIMS
        assert entry.quote and entry.place


def order_swap_gallery():
    """Two twin pairs of clips (0, 1) and (2, 3), two captions each: caption j of a clip and caption
    j of its twin form a caption pair."""
    split = analysis.twin_pair_split(["red then blue", "red, then blue"],
                                     ["blue then red", "blue, then red"], kind="order_swap")
    return dataclasses.replace(
        split, images=np.zeros((4, 4, 4, 3), dtype=np.uint8), captions=split.captions * 2,
        caption_image=np.repeat([0, 1, 2, 3], 2), image_ids=["a", "b", "c", "d"],
        twin=np.array([1, 0, 3, 2]), twin_kind=["order_swap"] * 4, caption_kind=["full"] * 8)


def test_same_pick_share_counts_caption_pairs_that_pick_one_item():
    split = order_swap_gallery()
    # Pair (0, 1): both captions j pick clip 0 for j = 0 (one right, one wrong), each its own for
    # j = 1. Pair (2, 3): every caption picks its own clip. Caption 7 is not a query.
    scores = np.array([[2, 1, 0, 0], [2, 1, 0, 0], [2, 1, 0, 0], [1, 2, 0, 0],
                       [0, 0, 2, 1], [0, 0, 2, 1], [0, 0, 1, 2]], dtype=float)
    preferences = analysis.twin_preferences(scores, split, queries=np.arange(7))
    share, pairs = analysis.same_pick_share(preferences, split)
    assert pairs == 3  # (0, 1) at j = 0 and 1, (2, 3) at j = 0; (2, 3) at j = 1 lacks caption 7
    assert share == pytest.approx(100 / 3)
    assert np.isnan(analysis.same_pick_share(preferences.iloc[:0], split)[0])


def test_twin_chance_table_and_sentence_read_each_interval_against_chance():
    split = order_swap_gallery()
    blind = np.tile([[2.0, 1.0, 2.0, 1.0]], (8, 1))  # every caption picks clips 0 and 2: 50%
    right = np.array([[1.0 if split.caption_image[q] == i else 0.0 for i in range(4)]
                      for q in range(8)])
    table = analysis.twin_chance_table({"blind": analysis.twin_preferences(blind, split),
                                        "right": analysis.twin_preferences(right, split)}, split)
    assert list(table.index) == [("blind", "order_swap"), ("blind", "all"),
                                 ("right", "order_swap"), ("right", "all")]
    blind_row, right_row = table.loc[("blind", "all")], table.loc[("right", "all")]
    assert (blind_row["right (%)"], blind_row["same pick (%)"], blind_row["caption pairs"]) == (50.0, 100.0, 4)
    assert blind_row["verdict"] == "not distinguishable from chance"
    assert (right_row["right (%)"], right_row["same pick (%)"]) == (100.0, 0.0)
    assert right_row["verdict"] == "above chance"  # 8 of 8: every bootstrap draw is 100%
    sentence = analysis.chance_sentence(table, "order_swap")
    assert sentence == ("order_swap twins (8 captions, 95% intervals against 50%): above chance: right; "
                        "not distinguishable from chance: blind; below chance: none.")
    only_blind = analysis.chance_sentence(table.loc[["blind"]], "all")
    assert only_blind.endswith("): blind: not distinguishable from chance.")
    doubled = pd.concat([table.loc[["blind"]], table.loc[["blind"]].rename(index={"blind": "twin"})])
    assert analysis.chance_sentence(doubled).endswith("all 2 models: not distinguishable from chance.")
    assert "does not apply" in analysis.chance_sentence(table.iloc[:0])


def test_chance_intervals_draw_one_panel_per_kind():
    table = pd.DataFrame({"method": ["fast", "fast", "slow", "slow"],
                          "kind": ["order_swap", "all"] * 2, "right (%)": [50.0, 50.0, 70.0, 60.0],
                          "low": [40.0, 45.0, 60.0, 55.0], "high": [60.0, 55.0, 80.0, 65.0],
                          "captions": [40, 80, 40, 80]}).set_index(["method", "kind"])
    fig = plots.chance_intervals(table)
    assert [ax.get_title() for ax in fig.axes] == ["order_swap (40 captions)", "all (80 captions)"]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["slow", "fast"]
