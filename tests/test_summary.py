"""Reading every run, and each paper claim judged from paired intervals over per-query ranks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fastslow import claims, results, summary
from fastslow.claims import INCONCLUSIVE, NOT_REPRODUCED, NOT_RUN, PARTLY, REPRODUCED

QUERIES = 400


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSLOW_RESULTS", str(tmp_path))
    return tmp_path


def ranks_with_recall(r1: float, *, order: int = 0, queries: int = QUERIES) -> np.ndarray:
    """Per-query ranks with R@1 = ``r1``: the first queries of a permutation drawn from ``order`` are
    found first, the rest at rank 2. Two methods with the same ``order`` are nested (strongly paired)."""
    found = np.random.default_rng(order).permutation(queries)[: round(r1 * queries / 100)]
    ranks = np.full(queries, 2)
    ranks[found] = 1
    return ranks


def row(experiment: str, method: str, r1: float, *, variant: str = "", direction: str = "t2i", seed: int = 0,
        run_seed: int | None = None, K: int | None = None, ms: float | None = None, dataset: str = "shapes", notebook: str = "02",
        gallery: int = 100, order: int = 0) -> dict:
    ranks = ranks_with_recall(r1, order=order)
    return {"notebook": notebook, "experiment": experiment, "method": method, "variant": variant, "dataset": dataset,
            "gallery": gallery, "direction": direction, "K": K, "seed": seed, "run_seed": run_seed, "R@1": r1, "R@1_lo": r1 - 2,
            "R@1_hi": r1 + 2, "R@5": r1 + 10, "R@10": r1 + 20, "MdR": 2.0, "queries": len(ranks),
            "ms_per_query": ms, "ranks": ranks}


def write(run: str, rows: list[dict]) -> None:
    results.record(results.run_dir(run), rows)


def verdict(claim: str, dataset: str = "shapes", profiles=("smoke",)) -> claims.Finding:
    return claims.claim_findings(claims.CLAIMS[claim], summary.load_summaries(profiles))[dataset]


@pytest.mark.parametrize(
    ("slow", "fast", "order", "expected"),
    [(30.0, 20.0, 0, REPRODUCED), (10.0, 20.0, 0, NOT_REPRODUCED), (20.5, 20.0, 1, INCONCLUSIVE)],
)
def test_slow_beats_fast_by_a_paired_interval(root, slow, fast, order, expected):
    write("smoke-shapes", [row("headline", "cross_attention", slow, notebook="03", order=order),
                           row("headline", "dual_encoder", fast)])
    finding = verdict("RQ1")
    assert finding.verdict == expected
    assert "95% paired interval" in finding.explanation
    assert list(finding.table.index) == ["Slow: cross_attention", "Fast: dual_encoder"]


def test_pairing_tells_a_small_consistent_gain_from_noise(root):
    # +2 points on 400 queries: nested (the same queries plus 8 more) is a clear gain; drawn
    # independently, the same two recalls cannot be told apart.
    write("smoke-shapes", [row("headline", "cross_attention", 22.0, notebook="03"), row("headline", "dual_encoder", 20.0)])
    assert verdict("RQ1").verdict == REPRODUCED
    write("smoke-shapes", [row("headline", "cross_attention", 22.0, notebook="03", order=5)])
    assert verdict("RQ1").verdict == INCONCLUSIVE


def test_seed_spread_widens_the_interval(root):
    # Slow's runs disagree (10 and 50): a mean gain of 10 points is within that spread.
    write("smoke-shapes", [row("headline", "cross_attention", r1, run_seed=s, notebook="03") for s, r1 in enumerate((10.0, 50.0))]
          + [row("headline", "dual_encoder", 20.0)])
    assert verdict("RQ1").verdict == INCONCLUSIVE
    write("smoke-shapes", [row("headline", "cross_attention", 30.0, run_seed=s, notebook="03") for s in range(2)])
    assert verdict("RQ1").verdict == REPRODUCED


def test_rows_without_ranks_are_not_judged(root):
    legacy = row("headline", "cross_attention", 30.0, notebook="03")
    write("smoke-shapes", [{**legacy, "ranks": None}, row("headline", "dual_encoder", 20.0)])
    assert verdict("RQ1").verdict == NOT_RUN


@pytest.mark.parametrize(("student", "expected"), [(35.0, REPRODUCED), (20.0, NOT_REPRODUCED)])
def test_tfs_distillation_is_judged_against_the_control(root, student, expected):
    write("smoke-shapes", [row("headline", "dual_encoder", 10.0)]  # a weak DE must not make the teacher look useful
          + [row("headline", "control", 30.0, run_seed=s, notebook="04") for s in range(3)]
          + [row("headline", "distilled_tfs", student, run_seed=s, notebook="04") for s in range(3)])
    finding = verdict("RQ2-TFS")
    assert finding.verdict == expected
    assert "control" in finding.explanation and "seeds 3 vs 3" in finding.explanation


def test_tfs_distillation_falls_back_to_the_dual_encoder_without_a_control(root):
    write("smoke-shapes", [row("headline", "dual_encoder", 10.0), row("headline", "distilled_tfs", 20.0, notebook="04")])
    finding = verdict("RQ2-TFS")
    assert finding.verdict == REPRODUCED
    assert "notebook-02" in finding.explanation


@pytest.mark.parametrize(
    ("student", "teacher_ms", "expected"),
    [(40.0, 200.0, REPRODUCED), (40.0, 50.0, PARTLY), (20.0, 0.5, NOT_REPRODUCED)],
)
def test_dcd_needs_both_accuracy_and_129x_speed(root, student, teacher_ms, expected):
    write("smoke-shapes", [row("headline", "dual_encoder", 30.0, ms=1.0),
                           row("headline", "control", 30.0, notebook="04"),
                           row("headline", "distilled_dcd", student, notebook="04"),
                           row("headline", "cross_attention", 50.0, ms=teacher_ms, notebook="03")])
    assert verdict("RQ2-DCD").verdict == expected


def k_sweep(fast_slow: dict[int, tuple[float, float]], slow: tuple[float, float], gallery: int = 100) -> list[dict]:
    """Notebook 05's rows of one gallery: ``fast_slow`` per K -> (R@1, ms), and Slow-only (R@1, ms)."""
    rows = [row("k_sweep", "fast_slow", r1, K=k, ms=ms, gallery=gallery, notebook="05") for k, (r1, ms) in fast_slow.items()]
    return rows + [row("k_sweep", "cross_attention", slow[0], ms=slow[1], gallery=gallery, notebook="05")]


def chosen(k: int) -> dict:
    """The headline Fast+Slow row: the K chosen on validation."""
    return row("headline", "fast_slow", 0.0, K=k, notebook="05")


@pytest.mark.parametrize(
    ("at_k5", "expected"),
    [((49.5, 0.8), REPRODUCED),  # re-ranking lifts R@1 and is 125x faster than Slow-only
     ((49.5, 5.0), PARTLY),  # lifts R@1, only 20x faster
     ((30.0, 5.0), NOT_REPRODUCED)],  # moves nothing, 20x faster
)
def test_reranking_rule_at_the_validation_k(root, at_k5, expected):
    write("smoke-shapes", [chosen(5)] + k_sweep({1: (30.0, 0.5), 5: at_k5, 100: (50.0, 101.0)}, slow=(50.0, 100.0)))
    finding = verdict("RQ3")
    assert finding.verdict == expected
    assert finding.table.loc[100, "K"] == 5
    assert "K = 5 (chosen on validation)" in finding.explanation


def test_reranking_verdict_comes_from_the_largest_gallery(root):
    write("smoke-shapes", [chosen(5)]
          + k_sweep({1: (30.0, 0.5), 5: (49.5, 5.0), 100: (50.0, 101.0)}, slow=(50.0, 100.0))
          + k_sweep({1: (20.0, 0.5), 5: (39.5, 1.0), 500: (40.0, 500.0)}, slow=(40.0, 500.0), gallery=500))
    finding = verdict("RQ3")
    assert finding.verdict == REPRODUCED  # 500 items: lifted, 500x faster
    assert list(finding.table["verdict"]) == [PARTLY, REPRODUCED]
    assert "500-item gallery" in finding.explanation


def test_a_gallery_where_slow_only_finds_nothing_shows_speed_only(root):
    write("smoke-shapes", [chosen(5)]
          + k_sweep({1: (30.0, 0.5), 5: (49.5, 5.0), 100: (50.0, 101.0)}, slow=(50.0, 100.0))
          + k_sweep({1: (0.0, 0.5), 5: (0.0, 1.0)}, slow=(0.0, 5000.0), gallery=10**5))  # R@1 [-2, 2]
    finding = verdict("RQ3")
    assert finding.verdict == PARTLY  # judged where Slow-only has accuracy to reach: 100 items
    assert list(finding.table["verdict"]) == [PARTLY, "speed only"]
    assert "100-item gallery" in finding.explanation


@pytest.mark.parametrize(
    ("variants", "expected"),
    [({"bidirectional": 40.0, "forward": 35.0, "itm": 20.0}, REPRODUCED),
     ({"bidirectional": 30.0, "forward": 35.0}, NOT_REPRODUCED),
     ({"forward": 35.0, "itm": 20.0}, NOT_RUN)],
)
def test_captioning_loss_rule(root, variants, expected):
    write("smoke-shapes", [row("loss_ablation", "cross_attention", r1, variant=f"objective={v}", notebook="03")
                           for v, r1 in variants.items()])
    assert verdict("RQ4").verdict == expected


@pytest.mark.parametrize(
    ("by_steps", "expected"),
    [({0: 30.0, 1: 35.0, 2: 40.0}, REPRODUCED), ({0: 30.0, 1: 29.0, 2: 28.0}, NOT_REPRODUCED), ({1: 35.0, 2: 40.0}, NOT_RUN)],
)
def test_upsampling_rule(root, by_steps, expected):
    write("smoke-shapes", [row("upsampling_ablation", "cross_attention", r1, variant=f"upsampling={s}", ms=1.0 + s, notebook="03")
                           for s, r1 in by_steps.items()])
    finding = verdict("RQ5")
    assert finding.verdict == expected
    if expected != NOT_RUN:
        assert sorted(finding.table.index) == sorted(f"upsampling={s}" for s in by_steps)


def test_missing_rows_give_not_run_everywhere(root):
    write("smoke-shapes", [row("headline", "dual_encoder", 20.0, ms=1.0)])  # only notebook 02 ran
    verdicts = claims.verdicts(summary.load_summaries(["smoke"]))
    assert set(verdicts["verdict"]) == {NOT_RUN}
    assert set(verdicts["claim"]) == set(claims.CLAIMS)
    # The video claim still gets a row, on the video dataset the study would use.
    assert verdicts.set_index("claim").loc["VIDEO", "dataset"] == "shapes-video"
    assert "not run" in claims.conclusions(verdicts)


def test_an_empty_results_folder_renders(root):
    rows = summary.load_summaries(["quick"])
    assert rows.empty
    assert set(claims.verdicts(rows)["verdict"]) == {NOT_RUN}
    assert summary.speed_accuracy_points(rows).empty
    assert "RQ1" in repr(claims.report("RQ1", rows))


def test_runs_of_other_profiles_are_ignored_and_datasets_kept_apart(root):
    write("smoke-shapes", [row("headline", "cross_attention", 30.0, notebook="03"), row("headline", "dual_encoder", 20.0)])
    write("smoke-flickr8k", [row("headline", "cross_attention", 10.0, dataset="flickr8k", notebook="03"),
                             row("headline", "dual_encoder", 20.0, dataset="flickr8k")])
    write("quick-shapes", [row("headline", "cross_attention", 5.0, notebook="03"), row("headline", "dual_encoder", 20.0)])
    rows = summary.load_summaries(["smoke"])
    assert set(rows["run"]) == {"smoke-shapes", "smoke-flickr8k"}
    matrix = claims.verdict_matrix(claims.verdicts(rows))
    assert (matrix.loc["RQ1", "shapes"], matrix.loc["RQ1", "flickr8k"]) == (REPRODUCED, NOT_REPRODUCED)
    assert (matrix.loc["VIDEO", "shapes-video"], matrix.loc["VIDEO", "shapes"]) == (NOT_RUN, "")  # video data only
    quick = claims.verdict_matrix(claims.verdicts(summary.load_summaries(["quick"])))
    assert quick.loc["RQ1", "shapes"] == NOT_REPRODUCED
    assert summary.runs_overview(rows).loc["smoke-flickr8k", "datasets"] == "flickr8k"


def test_video_rows_written_into_two_runs_are_counted_once(root):
    video = [row("headline", "dual_encoder", 20.0, dataset="shapes-video", notebook="06"),
             row("headline", "fast_slow", 30.0, dataset="shapes-video", K=10, notebook="06")]
    write("smoke-shapes", [{**r, "R@1": r["R@1"] - 5} for r in video])  # a stale copy in the image run
    write("smoke-shapes-video", video)
    rows = summary.load_summaries(["smoke"])
    assert set(rows[rows["dataset"] == "shapes-video"]["run"]) == {"smoke-shapes-video"}
    assert len(rows[rows["dataset"] == "shapes-video"]) == 2
    assert verdict("VIDEO", "shapes-video").verdict == REPRODUCED


def test_conclusions_and_claims_file_come_from_the_verdicts(root):
    write("smoke-shapes", [row("headline", "cross_attention", 30.0, notebook="03"), row("headline", "dual_encoder", 20.0)])
    verdicts = claims.verdicts(summary.load_summaries(["smoke"]))
    text = claims.conclusions(verdicts)
    assert text.startswith("On shapes, reproduced: RQ1")
    assert "not run: RQ2-TFS" in text
    path = claims.save_claims(verdicts, results.run_dir("smoke-shapes"))
    assert pd.read_csv(path).set_index(["claim", "dataset"]).loc[("RQ1", "shapes"), "verdict"] == REPRODUCED


def test_speed_accuracy_points_time_the_students_and_draw_each_point_once(root):
    write("smoke-shapes", [row("headline", "dual_encoder", 20.0, ms=2.0),
                           row("headline", "distilled_tfs", 24.0, run_seed=0, notebook="04"),
                           row("headline", "distilled_tfs", 26.0, run_seed=1, notebook="04"),
                           row("headline", "fast_slow", 40.0, K=5, ms=3.0, notebook="05")]
          + k_sweep({1: (20.0, 2.5), 5: (40.0, 3.0), 100: (45.0, 90.0)}, slow=(45.0, 80.0))
          + k_sweep({1: (15.0, 2.5), 5: (30.0, 3.0)}, slow=(35.0, 400.0), gallery=500))
    points = summary.speed_accuracy_points(summary.load_summaries(["smoke"]))
    tfs = points[points["method"] == "distilled_tfs"].iloc[0]
    assert (tfs["R@1"], tfs["ms_per_query"]) == (25.0, 2.0)
    small = points[points["group"] == "shapes, 100-item gallery"]
    assert len(small[(small["method"] == "fast_slow") & (small["K"] == 5)]) == 1
    assert len(small) == 1 + 1 + 3 + 1  # DE, TFS, three Fast+Slow K, Slow-only
    assert len(points[points["group"] == "shapes, 500-item gallery"]) == 3


def test_notebook_numbers_are_read_zero_padded(root):
    (root / "smoke-shapes").mkdir()
    legacy = {k: v for k, v in row("headline", "dual_encoder", 20.0, notebook="2").items() if k != "ranks"}
    pd.DataFrame([legacy]).to_csv(root / "smoke-shapes" / "summary.csv", index=False)
    assert summary.load_summaries(["smoke"])["notebook"].tolist() == ["02"]


def test_the_slow_model_is_read_from_the_k_sweep_when_notebook_03_did_not_run(root):
    write("smoke-shapes", [row("headline", "dual_encoder", 20.0, ms=1.0)]
          + k_sweep({1: (20.0, 1.5), 100: (30.0, 150.0)}, slow=(30.0, 140.0)))
    assert verdict("RQ1").verdict == REPRODUCED
    assert "140x faster" in verdict("RQ2-DCD").explanation


def test_a_rerun_notebook_leaves_no_row_of_its_previous_run(root):
    run = results.run_dir("smoke-shapes")
    write("smoke-shapes", [row("headline", "dual_encoder", 20.0), row("k_sweep", "fast_slow", 30.0, K=5, notebook="05")])
    old_ranks = set((run / "ranks").iterdir())
    assert results.forget_notebook(run, "05", seed=0) == 1
    write("smoke-shapes", [row("k_sweep", "fast_slow", 31.0, K=10, notebook="05")])
    table = results.read_summary(run)
    assert list(table["notebook"]) == ["02", "05"] and table["K"].iloc[1] == 10
    assert len(set((run / "ranks").iterdir()) & old_ranks) == 1  # notebook 05's old ranks file went too


def test_a_run_with_another_study_seed_keeps_the_first_seeds_rows(root):
    # Notebook 04 repeats its students over run seeds; `-p seed 1` must not replace study seed 0's.
    run = results.run_dir("smoke-shapes")
    write("smoke-shapes", [row("headline", "distilled_tfs", 30.0, run_seed=s, notebook="04") for s in range(3)])
    assert results.forget_notebook(run, "04", seed=1) == 0
    write("smoke-shapes", [row("headline", "distilled_tfs", 20.0, seed=1, run_seed=s, notebook="04") for s in range(3)])
    table = results.read_summary(run)
    assert sorted(zip(table["seed"], table["run_seed"])) == [(seed, s) for seed in (0, 1) for s in range(3)]
    assert summary.mean_std(table, by=["method"])["seeds"].item() == 6


def test_claims_compare_methods_under_the_study_seeds_both_ran(root):
    # Slow under study seed 1 only (far better) must not count against Fast's seed 0.
    write("smoke-shapes", [row("headline", "dual_encoder", 20.0),
                           row("headline", "cross_attention", 10.0, notebook="03"),
                           row("headline", "cross_attention", 90.0, seed=1, notebook="03")])
    assert verdict("RQ1").verdict == NOT_REPRODUCED
