"""Each paper claim checked against our runs, with paired confidence intervals.

A claim is data (:class:`Claim`): the paper, what it states, the rule that turns our numbers into
a verdict, and the check that applies the rule to one dataset's summary rows. Every comparison a
verdict rests on is a **paired** bootstrap interval over the same queries (both methods' per-query
ranks, :func:`fastslow.intervals.paired_difference`), with the spread over seeds folded in where
several ran. A comparison is ``reproduced`` when its 95% interval lies above 0, ``not reproduced``
when below, ``inconclusive`` when it straddles 0. A claim with several parts (accuracy and speed)
is ``partly`` reproduced when one part is reproduced and another is not
(:func:`combine_verdicts`). ``not run`` when the rows a rule needs are missing.
Numbers are text-to-image R@1 (the papers' main task) unless a rule says otherwise.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fastslow.config import VIDEO_DATASETS
from fastslow.files import atomic_write
from fastslow.intervals import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, Difference, paired_difference
from fastslow.results import REPLICATE_COLUMNS, read_ranks, replicate_count

PARTLY, NOT_RUN = "partly", "not run"
VERDICTS = (REPRODUCED, PARTLY, INCONCLUSIVE, NOT_REPRODUCED, NOT_RUN)

ORDERS_OF_MAGNITUDE = 100.0  # "several orders of magnitude" faster, read as at least 100x
DCD_SPEED_UP = 129.0  # DCD: inference "at least 129x" faster than existing retrieval models

TFS = "Miech et al., Thinking Fast and Slow (CVPR 2021)"
DCD = "Rao et al., Dynamic Contrastive Distillation (2022)"


@dataclass(frozen=True)
class Finding:
    """What one claim's rule found on one dataset: our numbers, the verdict and why, in a sentence."""

    table: pd.DataFrame
    verdict: str
    explanation: str


@dataclass(frozen=True)
class Claim:
    """One paper claim: who claims it, what they state, how we decide, and the check that decides."""

    id: str
    title: str
    paper: str
    statement: str
    rule: str
    check: Callable[[pd.DataFrame], Finding]
    video_only: bool = False
    # Where the study would test it when no run has rows yet (shown as "not run").
    default_dataset: str = "shapes"

    def applies_to(self, dataset: str) -> bool:
        return dataset in VIDEO_DATASETS if self.video_only else True


# --- picking rows and comparing them ------------------------------------------------------------


@dataclass(frozen=True)
class Pick:
    """Which summary rows stand for one method: experiment, method, and optionally variant, K and
    gallery (None: any), text-to-image unless said otherwise. Several rows are its seeds."""

    experiment: str
    method: str
    variant: str = ""
    K: int | None = None
    gallery: int | None = None
    direction: str = "t2i"

    def rows(self, rows: pd.DataFrame) -> pd.DataFrame:
        chosen = rows[(rows["experiment"] == self.experiment) & (rows["method"] == self.method)
                      & (rows["variant"] == self.variant) & (rows["direction"] == self.direction)]
        chosen = chosen[chosen["K"].isna()] if self.K is None else chosen[chosen["K"] == self.K]
        if self.gallery is not None:
            chosen = chosen[chosen["gallery"] == self.gallery]
        return chosen.sort_values(REPLICATE_COLUMNS)


def seed_ranks(rows: pd.DataFrame) -> list[np.ndarray] | None:
    """The per-query ranks of each row (one per seed), or None when a row has none on disk."""
    if rows.empty or rows["ranks"].isna().any():
        return None
    paths = [Path(run_dir) / "ranks" / name for run_dir, name in zip(rows["run_dir"], rows["ranks"])]
    if not all(p.is_file() for p in paths):
        return None
    return [read_ranks(p.parent.parent, p.name) for p in paths]


def compare(rows: pd.DataFrame, a: Pick, b: Pick, k: int = 1) -> Difference | None:
    """R@k of ``a`` minus ``b`` with its paired interval over their common queries; None when either
    is missing or they were not scored on the same queries."""
    rows_a, rows_b = a.rows(rows), b.rows(rows)
    # Like with like: only the study seeds both methods ran under.
    shared = set(rows_a["seed"]) & set(rows_b["seed"])
    ranks_a = seed_ranks(rows_a[rows_a["seed"].isin(shared)])
    ranks_b = seed_ranks(rows_b[rows_b["seed"].isin(shared)])
    if ranks_a is None or ranks_b is None or {len(r) for r in ranks_a} != {len(r) for r in ranks_b}:
        return None
    return paired_difference(ranks_a, ranks_b, k)


def describe(a: str, b: str, difference: Difference) -> str:
    seeds = "" if difference.seeds_a == difference.seeds_b == 1 else f", seeds {difference.seeds_a} vs {difference.seeds_b}"
    return (f"{a} − {b}: {difference.mean:+.1f} R@1 points, 95% paired interval "
            f"[{difference.lo:+.1f}, {difference.hi:+.1f}] over {difference.queries} queries{seeds}")


def interval_table(rows: pd.DataFrame, picks: dict[str, Pick]) -> pd.DataFrame:
    """R@1 with its interval, R@5, R@10 (means over seeds), ms per query, queries and seeds per label."""
    table = {}
    for label, pick in picks.items():
        chosen = pick.rows(rows)
        if chosen.empty:
            continue
        table[label] = {
            "R@1": chosen["R@1"].mean(), "R@1 low": chosen["R@1_lo"].mean(), "R@1 high": chosen["R@1_hi"].mean(),
            "R@5": chosen["R@5"].mean(), "R@10": chosen["R@10"].mean(), "ms/query": chosen["ms_per_query"].mean(),
            "queries": chosen["queries"].max(), "seeds": replicate_count(chosen),
        }
    return pd.DataFrame(table).T.round(2) if table else pd.DataFrame()


def combine_verdicts(verdicts: Sequence[str]) -> str:
    """A claim with several parts: reproduced when every part that ran is; partly when some are and
    others not; without a reproduced part, not reproduced if any part is, else inconclusive; not
    run if no part ran."""
    ran = [v for v in verdicts if v != NOT_RUN]
    if not ran:
        return NOT_RUN
    if REPRODUCED in ran:
        return REPRODUCED if set(ran) == {REPRODUCED} else PARTLY
    return NOT_REPRODUCED if NOT_REPRODUCED in ran else INCONCLUSIVE


def speed_verdict(speed_up: float, needed: float) -> str:
    return REPRODUCED if speed_up >= needed else NOT_REPRODUCED


# --- the checks ---------------------------------------------------------------------------------

FAST = Pick("headline", "dual_encoder")


def slow_pick(rows: pd.DataFrame) -> Pick:
    """The Slow model's headline rows (notebook 03), else notebook 05's Slow-only end point of the
    K sweep on the test gallery (the same model on the same headline queries)."""
    if not Pick("headline", "cross_attention").rows(rows).empty:
        return Pick("headline", "cross_attention")
    galleries = Pick("k_sweep", "cross_attention").rows(rows)["gallery"]
    return Pick("k_sweep", "cross_attention", gallery=int(galleries.min()) if len(galleries) else None)


def check_slow_beats_fast(rows: pd.DataFrame) -> Finding:
    """RQ1: cross_attention − dual_encoder headline t2i R@1, paired."""
    slow = slow_pick(rows)
    table = interval_table(rows, {"Slow: cross_attention": slow, "Fast: dual_encoder": FAST})
    difference = compare(rows, slow, FAST)
    if difference is None:
        return Finding(table, NOT_RUN, "Needs headline rows with ranks of cross_attention (notebook 03 or 05) and dual_encoder (02).")
    return Finding(table, difference.verdict, describe("Slow", "Fast", difference) + ".")


def _distillation(rows: pd.DataFrame, method: str) -> tuple[Finding, Difference | None]:
    student, control = Pick("headline", method), Pick("headline", "control")
    baseline = "the no-teacher control"
    if control.rows(rows).empty:
        control, baseline = FAST, "the notebook-02 dual encoder (no control ran)"
    picks = {f"student: {method}": student, "control: notebook 02's recipe, no teacher": Pick("headline", "control"),
             "dual_encoder (notebook 02)": FAST, "teacher: cross_attention": slow_pick(rows)}
    table = interval_table(rows, picks)
    difference = compare(rows, student, control)
    if difference is None:
        return Finding(table, NOT_RUN, f"Needs headline rows with ranks of {method} (notebook 04) and of a baseline."), None
    return Finding(table, difference.verdict, describe(method, baseline, difference) + "."), difference


def check_tfs_distillation(rows: pd.DataFrame) -> Finding:
    """RQ2 (TFS): distilled_tfs − control headline t2i R@1, paired over queries, seeds folded in."""
    return _distillation(rows, "distilled_tfs")[0]


def check_dcd_distillation(rows: pd.DataFrame) -> Finding:
    """RQ2 (DCD): accuracy as for TFS; speed = teacher ÷ student ms per query, ≥ 129x."""
    accuracy, _ = _distillation(rows, "distilled_dcd")
    teacher_ms = slow_pick(rows).rows(rows)["ms_per_query"].mean()
    student_ms = FAST.rows(rows)["ms_per_query"].mean()
    if not (np.isfinite(teacher_ms) and np.isfinite(student_ms)):
        return Finding(accuracy.table, combine_verdicts([accuracy.verdict, NOT_RUN]),
                       accuracy.explanation + " The speed part needs ms_per_query of the teacher (03 or 05) and the dual encoder (02).")
    speed_up = teacher_ms / student_ms
    sentence = f" The student answers a query {speed_up:.0f}x faster than the teacher ({student_ms:.2f} vs {teacher_ms:.1f} ms)."
    verdict = combine_verdicts([accuracy.verdict, speed_verdict(speed_up, DCD_SPEED_UP)])
    return Finding(accuracy.table, verdict, accuracy.explanation + sentence)


def headline_k(rows: pd.DataFrame) -> int | None:
    """The re-ranking depth of the headline Fast+Slow row (chosen on validation), if one ran."""
    ks = rows[(rows["experiment"] == "headline") & (rows["method"] == "fast_slow")]["K"].dropna()
    return int(ks.iloc[0]) if len(ks) else None


def check_reranking(rows: pd.DataFrame) -> Finding:
    """RQ3, per gallery of notebook 05's K sweep, at the K chosen on validation (the headline
    fast_slow row's K): accuracy = Fast+Slow − Fast (K = 1 re-ranks nothing), paired; speed =
    Slow-only ÷ Fast+Slow ms per query, ≥ 100x. How far Fast+Slow stays from Slow-only is shown
    with its interval. The verdict is the one at the largest gallery (the claim is about scale)
    where the Slow model alone has accuracy to reach (its R@1 interval above 0): where it ranks no
    query's own image first, as in 100,000 near-duplicate shapes scenes, a gallery shows speed only."""
    k = headline_k(rows)
    galleries = sorted(rows[rows["experiment"] == "k_sweep"]["gallery"].dropna().unique())
    if k is None or not galleries:
        return Finding(pd.DataFrame(), NOT_RUN, "Needs notebook 05's K sweep and its headline fast_slow row (K chosen on validation).")
    found = []
    for gallery in galleries:
        at_k, fast = Pick("k_sweep", "fast_slow", K=k, gallery=gallery), Pick("k_sweep", "fast_slow", K=1, gallery=gallery)
        slow = Pick("k_sweep", "cross_attention", gallery=gallery)
        gain, gap = compare(rows, at_k, fast), compare(rows, at_k, slow)
        fast_slow_ms, slow_ms = at_k.rows(rows)["ms_per_query"].mean(), slow.rows(rows)["ms_per_query"].mean()
        if gain is None or gap is None or not np.isfinite(fast_slow_ms / slow_ms):
            continue
        speed_up = slow_ms / fast_slow_ms
        found.append({"gallery": int(gallery), "K": k, "Fast+Slow − Fast": gain, "Fast+Slow − Slow": gap, "speed-up": speed_up,
                      "verdict": combine_verdicts([gain.verdict, speed_verdict(speed_up, ORDERS_OF_MAGNITUDE)]),
                      "judged": bool(slow.rows(rows)["R@1_lo"].mean() > 0)})
    if not found:
        return Finding(pd.DataFrame(), NOT_RUN, f"Needs k_sweep rows with ranks at K = {k}, K = 1 and Slow-only.")
    table = pd.DataFrame([{"gallery": f["gallery"], "K": f["K"],
                           **{f"{name} [low, high]": f"{f[name].mean:+.1f} [{f[name].lo:+.1f}, {f[name].hi:+.1f}]"
                              for name in ("Fast+Slow − Fast", "Fast+Slow − Slow")},
                           "speed-up": round(f["speed-up"], 1), "verdict": f["verdict"] if f["judged"] else "speed only"}
                          for f in found]).set_index("gallery")
    largest = ([f for f in found if f["judged"]] or found)[-1]
    explanation = (f"On the {largest['gallery']}-item gallery at K = {k} (chosen on validation): "
                   + describe("Fast+Slow", "Fast", largest["Fast+Slow − Fast"]) + "; "
                   + describe("Fast+Slow", "Slow-only", largest["Fast+Slow − Slow"])
                   + f"; {largest['speed-up']:.0f}x faster than Slow-only.")
    return Finding(table, largest["verdict"], explanation)


def _ablation(rows: pd.DataFrame, experiment: str) -> dict[str, Pick]:
    variants = rows[(rows["experiment"] == experiment) & (rows["direction"] == "t2i")]["variant"].dropna().unique()
    return {v: Pick(experiment, "cross_attention", variant=v) for v in sorted(variants)}


def check_captioning_loss(rows: pd.DataFrame) -> Finding:
    """RQ4: bidirectional − the best alternative objective (forward-only, ITM) in notebook 03's
    loss ablation, paired over the same queries."""
    variants = _ablation(rows, "loss_ablation")
    table = interval_table(rows, variants)
    ours = "objective=bidirectional"
    if ours not in variants or len(variants) < 2:
        return Finding(table, NOT_RUN, "Needs notebook 03's loss ablation: bidirectional and at least one alternative.")
    rival = max((v for v in variants if v != ours), key=lambda v: table.loc[v, "R@1"])
    difference = compare(rows, variants[ours], variants[rival])
    if difference is None:
        return Finding(table, NOT_RUN, "The loss ablation's rows have no per-query ranks.")
    return Finding(table, difference.verdict, describe("bidirectional", f"the best alternative ({rival})", difference) + ".")


def check_upsampling(rows: pd.DataFrame) -> Finding:
    """RQ5: the most upsampling steps − none (the coarse map only) in notebook 03's ablation, paired."""
    variants = _ablation(rows, "upsampling_ablation")
    table = interval_table(rows, variants)
    steps = {int(v.partition("=")[2]): v for v in variants}
    if 0 not in steps or len(steps) < 2:
        return Finding(table, NOT_RUN, "Needs notebook 03's upsampling ablation: 0 steps and at least one more.")
    most = max(steps)
    difference = compare(rows, variants[steps[most]], variants[steps[0]])
    if difference is None:
        return Finding(table, NOT_RUN, "The upsampling ablation's rows have no per-query ranks.")
    cost = table.loc[steps[most], "ms/query"] / table.loc[steps[0], "ms/query"]
    return Finding(table, difference.verdict, describe(f"{most} upsampling steps", "none", difference) + f", at {cost:.1f}x the cost.")


def check_video(rows: pd.DataFrame) -> Finding:
    """VIDEO: fast_slow − dual_encoder headline t2i R@1 on a video dataset, paired."""
    picks = {m: Pick("headline", m) for m in ("dual_encoder", "control", "distilled_tfs", "distilled_dcd")}
    picks["fast_slow"] = Pick("headline", "fast_slow", K=headline_k(rows))
    picks["cross_attention"] = slow_pick(rows)
    table = interval_table(rows, picks)
    difference = compare(rows, picks["fast_slow"], FAST)
    if difference is None:
        return Finding(table, NOT_RUN, "Needs notebook 06's headline rows of fast_slow and dual_encoder.")
    return Finding(table, difference.verdict, describe("Fast+Slow", "Fast", difference) + " on clips.")


# --- the claims ---------------------------------------------------------------------------------

_EFFECT_RULE = ("reproduced if the 95% paired bootstrap interval of the difference lies above 0, not reproduced "
                "if below, inconclusive if it straddles 0")

CLAIMS: dict[str, Claim] = {
    c.id: c
    for c in (
        Claim(
            "RQ1",
            "the Slow cross-attention model is more accurate than the Fast dual encoder",
            TFS,
            "Vision-text transformers with cross-attention give considerable improvements in accuracy over "
            "dual encoders (joint embeddings); the paper's fine-grained cross-attention adds significant improvements.",
            f"difference = cross_attention − dual_encoder headline text-to-image R@1; {_EFFECT_RULE}.",
            check_slow_beats_fast,
        ),
        Claim(
            "RQ2-TFS",
            "distilling the Slow model into the Fast one improves the Fast one",
            TFS,
            "Distillation from the Slow model improves the Fast, indexable dual encoder.",
            f"difference = distilled_tfs − control (notebook 02's dual encoder of the same seed: the same training with no teacher) headline text-to-image "
            f"R@1, over queries and seeds (the notebook-02 dual encoder when no control ran); {_EFFECT_RULE}.",
            check_tfs_distillation,
        ),
        Claim(
            "RQ2-DCD",
            "dynamic contrastive distillation improves the student, which stays far faster than its teacher",
            DCD,
            "A student distilled with teacher-chosen hard negatives and dynamic sample weights retrieves better "
            "than without the teacher, and inference is at least 129x faster than existing (cross-encoder) "
            "image-text retrieval models.",
            f"two parts: accuracy, distilled_dcd − control t2i R@1 ({_EFFECT_RULE}); speed, teacher ÷ student "
            "ms per query, reproduced at ≥ 129x; partly when one part is reproduced and the other not.",
            check_dcd_distillation,
        ),
        Claim(
            "RQ3",
            "re-ranking the Fast top-K with the Slow model reaches Slow accuracy at a fraction of its cost",
            TFS,
            "Combining the Fast model with the Slow one by re-ranking keeps results competitive with the state of "
            "the art while increasing inference speed by several orders of magnitude (Flickr30K).",
            f"at the K chosen on validation, per gallery: accuracy, Fast+Slow − Fast t2i R@1 ({_EFFECT_RULE}); "
            "speed, Slow-only ÷ Fast+Slow ms per query, reproduced at ≥ 100x; partly when one part is reproduced "
            "and the other not. "
            "The distance to Slow-only is shown with its interval. The verdict is the one at the largest gallery.",
            check_reranking,
        ),
        Claim(
            "RQ4",
            "scoring by bidirectional captioning beats the alternative objectives",
            TFS,
            "The Slow model scores an image-caption pair by the likelihood of the caption generated in both "
            "directions (bidirectional captioning), which the paper prefers to the alternatives it compares.",
            f"difference = bidirectional − the best of (forward-only, image-text matching) t2i R@1 in notebook 03's "
            f"loss ablation; {_EFFECT_RULE}.",
            check_captioning_loss,
        ),
        Claim(
            "RQ5",
            "progressive upsampling, a finer attended feature map, improves the Slow model",
            TFS,
            "Fine-grained cross-attention, attending to a higher-resolution feature map obtained by upsampling, "
            "improves retrieval accuracy while preserving scalability.",
            f"difference = t2i R@1 with the most upsampling steps − with none, in notebook 03's upsampling "
            f"ablation; {_EFFECT_RULE}.",
            check_upsampling,
        ),
        Claim(
            "VIDEO",
            "Fast+Slow carries over to video",
            TFS,
            "The method extends to the video domain, improving the state of the art on VATEX.",
            f"on a video dataset, difference = fast_slow − dual_encoder headline t2i R@1; {_EFFECT_RULE}.",
            check_video,
            video_only=True,
            default_dataset="shapes-video",
        ),
    )
}


# --- putting it together ------------------------------------------------------------------------


def claim_findings(claim: Claim, summary: pd.DataFrame) -> dict[str, Finding]:
    """The claim's finding on every dataset it applies to that has rows (its default dataset,
    not run, when none has)."""
    datasets = [d for d in sorted(summary["dataset"].dropna().unique()) if claim.applies_to(d)]
    return {d: claim.check(summary[summary["dataset"] == d]) for d in datasets or [claim.default_dataset]}


@dataclass(frozen=True)
class ClaimReport:
    """One claim, what the paper says and our finding per dataset; renders as HTML in a notebook."""

    claim: Claim
    findings: dict[str, Finding] = field(default_factory=dict)

    def _repr_html_(self) -> str:
        c = self.claim
        parts = [
            f"<h4>{c.id}: {html.escape(c.title)}</h4>",
            f"<p><b>Paper</b> ({html.escape(c.paper)}): {html.escape(c.statement)}</p>",
            f"<p><b>Rule</b>: {html.escape(c.rule)}</p>",
        ]
        for dataset, finding in self.findings.items():
            parts.append(f"<p><b>{html.escape(dataset)}: {finding.verdict}</b>. {html.escape(finding.explanation)}</p>")
            if not finding.table.empty:
                parts.append(finding.table.to_html(float_format=lambda v: f"{v:.2f}", na_rep=""))
        return "\n".join(parts)

    def __repr__(self) -> str:
        c = self.claim
        lines = [f"{c.id}: {c.title}", f"Paper ({c.paper}): {c.statement}", f"Rule: {c.rule}"]
        for dataset, finding in self.findings.items():
            lines.append(f"{dataset}: {finding.verdict}. {finding.explanation}")
            if not finding.table.empty:
                lines.append(finding.table.to_string(float_format=lambda v: f"{v:.2f}", na_rep=""))
        return "\n".join(lines)


def report(claim_id: str, summary: pd.DataFrame) -> ClaimReport:
    """The claim, the paper's statement, the rule, and our numbers and verdict on each dataset."""
    claim = CLAIMS[claim_id]
    return ClaimReport(claim, claim_findings(claim, summary))


def verdicts(summary: pd.DataFrame, claims: Sequence[Claim] | None = None) -> pd.DataFrame:
    """One row per claim and dataset: the verdict, its one-sentence explanation and the claim."""
    rows = []
    for claim in claims or CLAIMS.values():
        for dataset, finding in claim_findings(claim, summary).items():
            rows.append({"claim": claim.id, "dataset": dataset, "verdict": finding.verdict, "explanation": finding.explanation,
                         "title": claim.title, "paper": claim.paper, "statement": claim.statement, "rule": claim.rule})
    return pd.DataFrame(rows)


def verdict_matrix(verdict_rows: pd.DataFrame) -> pd.DataFrame:
    """Claims × datasets -> verdict (blank where a claim does not apply to a dataset)."""
    order = list(dict.fromkeys(verdict_rows["claim"]))
    matrix = verdict_rows.pivot(index="claim", columns="dataset", values="verdict").reindex(order)
    return matrix.fillna("").rename_axis(columns=None)


def save_claims(verdict_rows: pd.DataFrame, run: Path) -> Path:
    """Write ``claims.csv`` in the run folder (atomically, like ``summary.csv``)."""
    path = Path(run) / "claims.csv"
    atomic_write(path, lambda tmp: verdict_rows.to_csv(tmp, index=False))
    return path


def conclusions(verdict_rows: pd.DataFrame) -> str:
    """Which claims hold on which data, in plain sentences, from the verdicts alone."""
    sentences = []
    for dataset, group in verdict_rows.groupby("dataset", sort=True):
        by_verdict = {v: [f"{r.claim} ({r.title})" for r in group[group["verdict"] == v].itertuples()] for v in VERDICTS}
        said = [f"{v}: {'; '.join(claims)}" for v, claims in by_verdict.items() if claims]
        sentences.append(f"On {dataset}, " + ". ".join(said) + ".")
    return "\n".join(sentences) if sentences else "No runs to summarise yet."


# --- the papers' own numbers beside ours (notebook 07) -------------------------------------------

PAPER_NAMES = {TFS: "TFS", DCD: "DCD"}


@dataclass(frozen=True)
class PaperNumber:
    """A number a paper states (``number``; blank where it states the claim without one), quoted
    (``quote``, with an English ``translation`` where the source is not in English) with its place,
    and how our runs measure the same thing (``ours``: one dataset's summary rows -> text, blank
    when the rows are missing)."""

    claim: str
    paper: str
    place: str
    quote: str
    number: str
    paper_data: str
    ours: Callable[[pd.DataFrame], str]
    translation: str = ""


def _points(difference: Difference | None) -> str:
    if difference is None:
        return ""
    return f"{difference.mean:+.1f} R@1 points [{difference.lo:+.1f}, {difference.hi:+.1f}]"


def _ours_slow_minus_fast(rows: pd.DataFrame) -> str:
    return _points(compare(rows, slow_pick(rows), FAST))


def _ours_distillation(rows: pd.DataFrame, method: str) -> str:
    control = Pick("headline", "control")
    return _points(compare(rows, Pick("headline", method), FAST if control.rows(rows).empty else control))


def _ours_teacher_speed_up(rows: pd.DataFrame) -> str:
    teacher_ms = slow_pick(rows).rows(rows)["ms_per_query"].mean()
    student_ms = FAST.rows(rows)["ms_per_query"].mean()
    ratio = teacher_ms / student_ms
    return f"{ratio:.0f}x (student vs Slow teacher)" if np.isfinite(ratio) else ""


def _ours_rerank_speed_up(rows: pd.DataFrame) -> str:
    """Slow-only over Fast+Slow ms per query at the K chosen on validation, largest gallery timed."""
    k = headline_k(rows)
    galleries = sorted(rows[rows["experiment"] == "k_sweep"]["gallery"].dropna().unique())
    for gallery in reversed(galleries):
        fast_slow = Pick("k_sweep", "fast_slow", K=k, gallery=gallery).rows(rows)["ms_per_query"].mean()
        slow = Pick("k_sweep", "cross_attention", gallery=gallery).rows(rows)["ms_per_query"].mean()
        if k is not None and np.isfinite(slow / fast_slow):
            r1 = {name: Pick("k_sweep", name, K=k if name == "fast_slow" else None, gallery=gallery)
                  .rows(rows)["R@1"].mean() for name in ("fast_slow", "cross_attention")}
            return (f"{slow / fast_slow:.0f}x (K = {k}, {int(gallery)}-item gallery; t2i R@1 "
                    f"{r1['fast_slow']:.1f} against Slow-only's {r1['cross_attention']:.1f})")
    return ""


PAPER_NUMBERS: tuple[PaperNumber, ...] = (
    PaperNumber(
        "RQ1", TFS, "abstract",
        "An alternative approach of using vision-text transformers with cross-attention gives considerable "
        "improvements in accuracy over the joint embeddings",
        "", "Flickr30K, COCO", _ours_slow_minus_fast,
    ),
    PaperNumber(
        "RQ2-DCD", DCD, "abstract",
        "Extensive experiments on MS-COCO and Flickr30K benchmarks show the effectiveness and efficiency of our "
        "DCD framework.",
        "", "MS-COCO, Flickr30K", lambda rows: _ours_distillation(rows, "distilled_dcd"),
    ),
    PaperNumber(  # the abstract typesets the sign as $\\times$
        "RQ2-DCD", DCD, "abstract",
        "Encouragingly, we can speed up the inference at least 129× compared to the existing ITR models.",
        "at least 129x faster inference", "MS-COCO, Flickr30K", _ours_teacher_speed_up,
    ),
    PaperNumber(
        "RQ3", TFS, "abstract",
        "we validate our approach on the Flickr30K image dataset where we show an increase in inference speed "
        "by several orders of magnitude while having results competitive to the state of the art",
        "several orders of magnitude (no figure given)", "Flickr30K", _ours_rerank_speed_up,
    ),
)


def paper_numbers_table(summary: pd.DataFrame, entries: Sequence[PaperNumber] = PAPER_NUMBERS) -> pd.DataFrame:
    """The papers' numbers beside ours: one row per :data:`PAPER_NUMBERS` entry, the paper's number
    (blank where it states none), its data and place, the quote (with its translation), and our
    measurement on each dataset that has rows (blank where the rows are missing)."""
    datasets = sorted(summary["dataset"].dropna().unique()) if len(summary) else []
    table = []
    for entry in entries:
        claim = CLAIMS[entry.claim]
        quote = f"“{entry.quote}”" + (f" ({entry.translation})" if entry.translation else "")
        row = {"claim": entry.claim, "paper's number": entry.number, "paper's data": entry.paper_data,
               "where": f"{PAPER_NAMES[entry.paper]}, {entry.place}", "quote": quote}
        for dataset in datasets:
            rows = summary[summary["dataset"] == dataset]
            row[f"ours: {dataset}"] = entry.ours(rows) if claim.applies_to(dataset) else ""
        table.append(row)
    return pd.DataFrame(table)
