"""The summary of paper claims: reading every run, the verdict rules, and "not run" for missing rows."""

from __future__ import annotations

import pandas as pd
import pytest

from fastslow import results, summary
from fastslow.summary import NOT_REPRODUCED, NOT_RUN, PARTLY, REPRODUCED


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSLOW_RESULTS", str(tmp_path))
    return tmp_path


def row(experiment: str, method: str, r1: float, *, direction: str = "t2i", seed: int = 0, K: int | None = None,
        ms: float | None = None, dataset: str = "shapes", notebook: str = "02") -> dict:
    return {"notebook": notebook, "experiment": experiment, "method": method, "dataset": dataset, "direction": direction,
            "K": K, "seed": seed, "R@1": r1, "R@5": r1 + 10, "R@10": r1 + 20, "MdR": 3.0, "ms_per_query": ms}


def write(run: str, rows: list[dict]) -> None:
    results.record(results.run_dir(run), rows)


def verdict(claim: str, dataset: str = "shapes", profiles=("smoke",)) -> summary.Finding:
    return summary.claim_findings(summary.CLAIMS[claim], summary.load_summaries(profiles))[dataset]


@pytest.mark.parametrize(
    ("slow", "fast", "expected"),
    [(30.0, 20.0, REPRODUCED), (20.5, 20.0, PARTLY), (19.0, 20.0, NOT_REPRODUCED), (20.0, 20.0, NOT_REPRODUCED)],
)
def test_slow_beats_fast_rule(root, slow, fast, expected):
    write("smoke-shapes", [row("headline", "cross_attention", slow, notebook="03"), row("headline", "dual_encoder", fast)])
    finding = verdict("RQ1")
    assert finding.verdict == expected
    assert list(finding.table.index) == ["Slow: cross_attention", "Fast: dual_encoder"]


def test_seed_spread_widens_the_noise_margin(root):
    # Slow: mean 30, std 10 over three seeds; a 5-point gain is inside that spread.
    write("smoke-shapes", [row("headline", "cross_attention", r1, seed=s) for s, r1 in enumerate((20.0, 30.0, 40.0))]
          + [row("headline", "dual_encoder", 25.0)])
    assert verdict("RQ1").verdict == PARTLY


def test_mean_and_std_over_seeds(root):
    write("smoke-shapes", [row("headline", "distilled_tfs", r1, seed=s, notebook="04") for s, r1 in enumerate((10.0, 20.0, 30.0))])
    rows = summary.load_summaries(["smoke"])
    stats = summary.seed_stats(summary.select(rows, "headline", "distilled_tfs"))
    assert (stats.mean, stats.std, stats.seeds) == (20.0, 10.0, 3)
    table = summary.recall_table(rows, {"tfs": ("headline", "distilled_tfs")}, directions=("t2i",))
    assert table.loc["tfs", "t2i R@1"] == "20.0 ± 10.0"
    assert table.loc["tfs", "t2i R@5"] == "30.0 ± 10.0"
    assert table.loc["tfs", "seeds"] == 3


@pytest.mark.parametrize(("student", "expected"), [(35.0, REPRODUCED), (30.5, PARTLY), (29.0, NOT_REPRODUCED)])
def test_tfs_distillation_is_judged_against_the_control(root, student, expected):
    write("smoke-shapes", [row("headline", "dual_encoder", 10.0)]  # a weak DE must not make the teacher look useful
          + [row("distillation_control", "dual_encoder", 30.0, seed=s, notebook="04") for s in range(3)]
          + [row("headline", "distilled_tfs", student, seed=s, notebook="04") for s in range(3)])
    finding = verdict("RQ2-TFS")
    assert finding.verdict == expected
    assert "control" in finding.explanation


def test_tfs_distillation_falls_back_to_the_dual_encoder_without_a_control(root):
    write("smoke-shapes", [row("headline", "dual_encoder", 10.0), row("headline", "distilled_tfs", 20.0, notebook="04")])
    finding = verdict("RQ2-TFS")
    assert finding.verdict == REPRODUCED
    assert "notebook-02" in finding.explanation


@pytest.mark.parametrize(
    ("student", "teacher_ms", "expected"),
    [(40.0, 200.0, REPRODUCED), (40.0, 50.0, PARTLY), (29.0, 200.0, PARTLY), (29.0, 0.5, NOT_REPRODUCED)],
)
def test_dcd_needs_both_accuracy_and_129x_speed(root, student, teacher_ms, expected):
    write("smoke-shapes", [row("headline", "dual_encoder", 30.0, ms=1.0),
                           row("distillation_control", "dual_encoder", 30.0, notebook="04"),
                           row("headline", "distilled_dcd", student, notebook="04"),
                           row("headline", "cross_attention", 50.0, ms=teacher_ms, notebook="03")])
    assert verdict("RQ2-DCD").verdict == expected


def test_dcd_accuracy_alone_decides_when_nothing_was_timed(root):
    write("smoke-shapes", [row("distillation_control", "dual_encoder", 30.0, notebook="04"),
                           row("headline", "distilled_dcd", 40.0, notebook="04")])
    finding = verdict("RQ2-DCD")
    assert finding.verdict == REPRODUCED
    assert "needs ms_per_query" in finding.explanation


def k_sweep(fast_slow: dict[int, tuple[float, float]], slow: tuple[float, float], dataset: str = "shapes") -> list[dict]:
    """Notebook 05's rows: ``fast_slow`` per K -> (R@1, ms), and the Slow-only end point (R@1, ms)."""
    rows = [row("k_sweep", "fast_slow", r1, K=k, ms=ms, dataset=dataset, notebook="05") for k, (r1, ms) in fast_slow.items()]
    return rows + [row("k_sweep", "cross_attention", slow[0], ms=slow[1], dataset=dataset, notebook="05")]


@pytest.mark.parametrize(
    ("at_k5", "expected"),
    [
        ((49.5, 0.8), REPRODUCED),  # within 1 point of Slow-only, 125x faster
        ((49.5, 5.0), PARTLY),  # within 1 point, only 20x faster
        ((40.0, 0.8), PARTLY),  # never within 1 point, but well above Fast
        ((30.5, 0.8), NOT_REPRODUCED),  # re-ranking barely moves R@1
    ],
)
def test_reranking_rule(root, at_k5, expected):
    write("smoke-shapes", k_sweep({1: (30.0, 0.5), 5: at_k5, 100: (50.0, 101.0)}, slow=(50.0, 100.0)))
    finding = verdict("RQ3")
    assert finding.verdict == expected
    point = finding.table.loc[(100, "fast_slow")]
    assert point["Fast R@1 (K=1)"] == 30.0
    if expected == REPRODUCED:
        assert point["K"] == 5 and point["speed-up"] == pytest.approx(125.0)


def test_reranking_is_only_partly_when_slow_is_no_better_than_fast(root):
    write("smoke-shapes", k_sweep({1: (30.0, 0.5), 5: (30.0, 0.6), 100: (30.0, 101.0)}, slow=(30.0, 100.0)))
    assert verdict("RQ3").verdict == PARTLY


def test_reranking_verdict_comes_from_the_largest_gallery(root):
    # Test gallery (100 items): within 1 point at K=5 but only 20x faster -> partly.
    write("smoke-shapes", k_sweep({1: (30.0, 0.5), 5: (49.5, 5.0), 100: (50.0, 101.0)}, slow=(50.0, 100.0)))
    large = pd.DataFrame({"gallery_size": [500] * 4, "queries": [30] * 4, "K": [1, 5, 10, 500],
                          "R@1": [20.0, 39.5, 40.0, 40.0], "R@5": [30.0] * 4, "ms_per_query": [0.5, 1.0, 2.0, 500.0]})
    large["speed-up"] = 500.0 / large["ms_per_query"]
    results.save_metrics(results.run_dir("smoke-shapes"), "05_fast_slow", {"data": {"dataset": "shapes"}, "seed": 0},
                         {"large_gallery": large, "operating_points": None})
    finding = verdict("RQ3")
    assert finding.verdict == REPRODUCED  # 500 items: within 1 point at K=5, 500x faster
    assert sorted(finding.table.index.get_level_values("gallery")) == [100, 500]
    assert "100 items: partly" in finding.explanation


@pytest.mark.parametrize(
    ("variants", "expected"),
    [
        ({"cross_attention_bidirectional": 40.0, "cross_attention_forward": 35.0, "cross_attention_itm": 20.0}, REPRODUCED),
        ({"cross_attention": 40.0, "cross_attention_itm": 39.5}, PARTLY),
        ({"cross_attention_bidirectional": 30.0, "cross_attention_forward": 35.0}, NOT_REPRODUCED),
        ({"cross_attention_forward": 35.0, "cross_attention_itm": 20.0}, NOT_RUN),
    ],
)
def test_captioning_loss_rule(root, variants, expected):
    write("smoke-shapes", [row("loss_ablation", m, r1, notebook="03") for m, r1 in variants.items()])
    assert verdict("RQ4").verdict == expected


@pytest.mark.parametrize(
    ("by_steps", "expected"),
    [({0: 30.0, 1: 35.0, 2: 40.0}, REPRODUCED), ({0: 30.0, 1: 32.0, 2: 30.5}, PARTLY),
     ({0: 30.0, 1: 29.0, 2: 28.0}, NOT_REPRODUCED), ({1: 35.0, 2: 40.0}, NOT_RUN)],
)
def test_upsampling_rule(root, by_steps, expected):
    write("smoke-shapes", [row("upsampling_ablation", f"cross_attention_up{s}", r1, ms=1.0 + s, notebook="03") for s, r1 in by_steps.items()])
    finding = verdict("RQ5")
    assert finding.verdict == expected
    if expected != NOT_RUN:
        assert sorted(finding.table.index) == sorted(by_steps)


def test_missing_rows_give_not_run_everywhere(root):
    write("smoke-shapes", [row("headline", "dual_encoder", 20.0, ms=1.0)])  # only notebook 02 ran
    rows = summary.load_summaries(["smoke"])
    verdicts = summary.verdicts(rows)
    assert set(verdicts["verdict"]) == {NOT_RUN}
    assert set(verdicts["claim"]) == set(summary.CLAIMS)
    # The video claim still gets a row, on the video dataset the study would use.
    assert verdicts.set_index("claim").loc["VIDEO", "dataset"] == "shapes-video"
    assert "not run" in summary.conclusions(verdicts)


def test_an_empty_results_folder_renders(root):
    rows = summary.load_summaries(["quick"])
    assert rows.empty
    verdicts = summary.verdicts(rows)
    assert set(verdicts["verdict"]) == {NOT_RUN}
    assert summary.speed_accuracy_points(rows).empty
    assert "RQ1" in repr(summary.report("RQ1", rows))


def test_runs_of_other_profiles_are_ignored_and_datasets_kept_apart(root):
    write("smoke-shapes", [row("headline", "cross_attention", 30.0, notebook="03"), row("headline", "dual_encoder", 20.0)])
    write("smoke-flickr8k", [row("headline", "cross_attention", 10.0, dataset="flickr8k", notebook="03"),
                             row("headline", "dual_encoder", 20.0, dataset="flickr8k")])
    write("quick-shapes", [row("headline", "cross_attention", 5.0, notebook="03"), row("headline", "dual_encoder", 20.0)])
    rows = summary.load_summaries(["smoke"])
    assert set(rows["run"]) == {"smoke-shapes", "smoke-flickr8k"}
    matrix = summary.verdict_matrix(summary.verdicts(rows))
    assert matrix.loc["RQ1", "shapes"] == REPRODUCED
    assert matrix.loc["RQ1", "flickr8k"] == NOT_REPRODUCED
    assert (matrix.loc["VIDEO", "shapes-video"], matrix.loc["VIDEO", "shapes"]) == (NOT_RUN, "")  # video data only
    assert summary.verdict_matrix(summary.verdicts(summary.load_summaries(["quick"]))).loc["RQ1", "shapes"] == NOT_REPRODUCED
    assert summary.runs_overview(rows).loc["smoke-flickr8k", "datasets"] == "flickr8k"


def test_video_rows_written_into_two_runs_are_counted_once(root):
    video = [row("headline", "dual_encoder", 20.0, dataset="shapes-video", notebook="06"),
             row("headline", "fast_slow", 30.0, dataset="shapes-video", K=10, notebook="06")]
    write("smoke-shapes", [{**r, "R@1": r["R@1"] - 5} for r in video])  # a stale copy in the image run
    write("smoke-shapes-video", video)
    rows = summary.load_summaries(["smoke"])
    assert len(rows[rows["dataset"] == "shapes-video"]) == 2
    assert set(rows[rows["dataset"] == "shapes-video"]["run"]) == {"smoke-shapes-video"}
    finding = verdict("VIDEO", "shapes-video")
    assert finding.verdict == REPRODUCED
    assert "shapes" not in summary.claim_findings(summary.CLAIMS["VIDEO"], rows)


def test_conclusions_and_claims_file_come_from_the_verdicts(root):
    write("smoke-shapes", [row("headline", "cross_attention", 30.0, notebook="03"), row("headline", "dual_encoder", 20.0)])
    verdicts = summary.verdicts(summary.load_summaries(["smoke"]))
    text = summary.conclusions(verdicts)
    assert text.startswith("On shapes, reproduced: RQ1")
    assert "not run: RQ2-TFS" in text
    path = summary.save_claims(verdicts, results.run_dir("smoke-shapes"))
    assert pd.read_csv(path).set_index(["claim", "dataset"]).loc[("RQ1", "shapes"), "verdict"] == REPRODUCED


def test_speed_accuracy_points_time_the_students_and_draw_each_point_once(root):
    write("smoke-shapes", [row("headline", "dual_encoder", 20.0, ms=2.0),
                           row("headline", "distilled_tfs", 24.0, seed=0, notebook="04"),
                           row("headline", "distilled_tfs", 26.0, seed=1, notebook="04"),
                           row("headline", "fast_slow", 40.0, K=5, ms=3.0, notebook="05")]
          + k_sweep({1: (20.0, 2.5), 5: (40.0, 3.0), 100: (45.0, 90.0)}, slow=(45.0, 80.0)))
    points = summary.speed_accuracy_points(summary.load_summaries(["smoke"]))
    tfs = points[points["method"] == "distilled_tfs"].iloc[0]
    assert (tfs["R@1"], tfs["ms_per_query"]) == (25.0, 2.0)
    assert len(points[(points["method"] == "fast_slow") & (points["K"] == 5)]) == 1
    assert len(points) == 1 + 1 + 3 + 1  # DE, TFS, three Fast+Slow K, Slow-only


def test_notebook_numbers_are_read_zero_padded(root):
    (root / "smoke-shapes").mkdir()
    pd.DataFrame([row("headline", "dual_encoder", 20.0, notebook="2")]).to_csv(root / "smoke-shapes" / "summary.csv", index=False)
    assert summary.load_summaries(["smoke"])["notebook"].tolist() == ["02"]


def test_speed_accuracy_points_of_notebook_02_alone(root):
    write("smoke-shapes", [row("headline", "dual_encoder", 20.0, ms=2.0), row("full_protocol", "dual_encoder", 15.0, ms=2.0)])
    points = summary.speed_accuracy_points(summary.load_summaries(["smoke"]))
    assert points[["method", "ms_per_query", "R@1"]].values.tolist() == [["dual_encoder", 2.0, 20.0]]


def test_the_slow_model_is_read_from_the_k_sweep_when_notebook_03_did_not_run(root):
    write("smoke-shapes", [row("headline", "dual_encoder", 20.0, ms=1.0)] + k_sweep({1: (20.0, 1.5), 100: (30.0, 150.0)}, slow=(30.0, 140.0)))
    assert verdict("RQ1").verdict == REPRODUCED
    assert "140x faster" in verdict("RQ2-DCD").explanation
