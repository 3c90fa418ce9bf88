"""Where models fail: captions whose near-duplicate twin image differs only in binding or relation.

A twin pair (A, B) shares every word of its "full" captions (same template, attributes swapped or
the relation flipped), so a bag of words cannot tell caption j of A from caption j of B. A model
understands the caption when it scores A above B for A's caption.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from fastslow.data.types import CaptionedImages
from fastslow.intervals import recall_interval


def twin_preferences(scores, split: CaptionedImages, queries: np.ndarray | None = None) -> pd.DataFrame:
    """One row per "full" query caption whose image has a twin in the gallery.

    ``scores`` is ``(queries, images)``; row r stands for caption ``queries[r]`` of ``split``
    (all captions, in order, when ``queries`` is None).
    """
    scores = scores.detach().float().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    columns = ["caption", "caption_index", "image", "twin", "kind", "own_score", "twin_score", "rank_of_own", "prefers_own"]
    queries = np.arange(split.num_captions) if queries is None else np.asarray(queries)
    rows = []
    for row, caption in enumerate(queries):
        image = split.caption_image[caption]
        twin = split.twin[image]
        if twin < 0 or split.caption_kind[caption] != "full":
            continue
        own_score, twin_score = scores[row, image], scores[row, twin]
        rows.append(
            {
                "caption": split.captions[caption],
                "caption_index": int(caption),
                "image": int(image),
                "twin": int(twin),
                "kind": split.twin_kind[image],
                "own_score": float(own_score),
                "twin_score": float(twin_score),
                "rank_of_own": int((scores[row] >= own_score).sum()),
                "prefers_own": bool(own_score > twin_score),
            }
        )
    return pd.DataFrame(rows, columns=columns)  # no rows for data without twins (real photographs)


def twin_accuracy(preferences: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Percentage of twin captions where each model prefers the right image, by kind of twin."""
    table = {
        method: pref.groupby("kind")["prefers_own"].mean().mul(100).round(1) for method, pref in preferences.items()
    }
    frame = pd.DataFrame(table, index=sorted({k for p in preferences.values() for k in p["kind"]})).T
    frame["all"] = pd.Series({m: 100 * p["prefers_own"].mean() for m, p in preferences.items()}).round(1)
    frame.index.name = "method"
    return frame


def confused_pairs(preferences: pd.DataFrame, split: CaptionedImages, n: int = 6) -> pd.DataFrame:
    """The query captions where the model put the twin first, with the twin's own caption beside
    them: concrete pairs that differ only in binding or relation."""
    wrong = preferences[~preferences["prefers_own"] & (preferences["rank_of_own"] > 1)]
    wrong = wrong.assign(margin=wrong["twin_score"] - wrong["own_score"]).sort_values("margin", ascending=False)
    wrong = wrong.groupby("kind", group_keys=False).head(max(1, n // 2)).head(n)
    twin_caption = []
    for _, row in wrong.iterrows():
        position = split.captions_of(row["image"]).index(row["caption"])
        twin_caption.append(split.captions_of(row["twin"])[position])
    return wrong.assign(twin_caption=twin_caption)[
        ["kind", "caption", "twin_caption", "image", "twin", "own_score", "twin_score", "rank_of_own"]
    ].reset_index(drop=True)


def bag_of_words_oracle_scores(split: CaptionedImages, queries: np.ndarray, words: list[str]) -> np.ndarray:
    """What words alone can do, even knowing every gallery image's true captions.

    score(query, image) = the best cosine similarity between the query's word counts and those of
    one of the image's own captions, leaving the query itself out. Twins tie by construction.
    """
    from fastslow.data.text import split_words

    vocabulary = {word: i for i, word in enumerate(words)}
    counts = np.zeros((split.num_captions, len(vocabulary)), dtype=np.int64)
    for row, caption in enumerate(split.captions):
        for word in split_words(caption):
            if word in vocabulary:
                counts[row, vocabulary[word]] += 1
    # Integer dot products are exact, so twins (the same words) tie exactly on every machine; a
    # float matrix product may sum in another order and break the tie by rounding.
    norms = np.sqrt((counts * counts).sum(1)).clip(min=1e-6)
    similarity = (counts[queries] @ counts.T) / (norms[queries, None] * norms[None, :])  # (queries, captions)
    similarity[np.arange(len(queries)), queries] = -np.inf
    scores = np.full((len(queries), len(split)), -np.inf)
    np.maximum.at(scores.T, split.caption_image, similarity.T)
    return scores


def split_statistics(splits: dict[str, CaptionedImages], tokenizer) -> pd.DataFrame:
    """Images, captions, twins and caption kinds per split."""
    rows = {}
    for name, split in splits.items():
        kinds = pd.Series(split.caption_kind)
        rows[name] = {
            "images": len(split),
            "captions": split.num_captions,
            "captions per image": split.num_captions / max(1, len(split)),
            "images with a twin": int((split.twin >= 0).sum()),
            "attribute-swap twins": split.twin_kind.count("attribute_swap"),
            "relation-flip twins": split.twin_kind.count("relation_flip"),
            "partial captions (%)": round(100 * float((kinds == "partial").mean()), 1),
            "unreadable images skipped": len(split.skipped),
        }
    frame = pd.DataFrame(rows)
    frame.loc["vocabulary (train)"] = tokenizer.vocab_size
    return frame


def split_origins(splits: dict[str, CaptionedImages]) -> pd.DataFrame:
    """Where each split came from (its ``meta``: the list file, the release split it was taken
    from, a carved validation set), one row per split; generated data says so."""
    rows = {name: dict(split.meta) or {"source": "generated (deterministic from the seed)"} for name, split in splits.items()}
    return pd.DataFrame(rows).T.fillna("").rename_axis("split")


def newly_right(before: pd.Series, after: pd.Series, captions: list[str], n: int = 8) -> pd.DataFrame:
    """Queries ranked first by ``after`` but not by ``before`` (text-to-image ranks per query)."""
    gained = (after == 1) & (before > 1)
    rows = [{"caption": captions[i], "rank before": int(before[i]), "rank after": 1} for i in np.flatnonzero(gained)[:n]]
    return pd.DataFrame(rows)


# --- toy examples and verdict sentences (notebooks 01 and 02) ------------------------------------


def twin_pair_split(captions: list[str], twin_captions: list[str], kind: str = "attribute_swap") -> CaptionedImages:
    """A two-image test gallery for a toy example: image 0 with ``captions``, image 1, its twin, with
    ``twin_captions`` (the same number); the images are blank, only the captions matter."""
    if len(captions) != len(twin_captions) or not captions:
        raise ValueError(f"a twin pair needs as many captions on each side, got {len(captions)} and {len(twin_captions)}")
    texts = list(captions) + list(twin_captions)
    return CaptionedImages(
        dataset="toy", split="test", images=np.zeros((2, 4, 4, 3), dtype=np.uint8), captions=texts,
        caption_image=np.repeat([0, 1], len(captions)), image_ids=["image", "twin"], twin=np.array([1, 0]),
        twin_kind=[kind, kind], caption_kind=["full"] * len(texts), skipped=[],
    )


def twin_share_interval(preferences: pd.DataFrame) -> tuple[float, float, float, int]:
    """The percentage of twin captions on which a model prefers the right image, with its 95%
    bootstrap interval over those captions: ``(share, low, high, captions)`` (NaNs when none).

    A caption that prefers its own image counts as found first (rank 1), one that does not as
    rank 2, so the interval is :func:`fastslow.intervals.recall_interval` at k = 1."""
    if preferences.empty:
        return float("nan"), float("nan"), float("nan"), 0
    ranks = np.where(preferences["prefers_own"].to_numpy(dtype=bool), 1, 2)
    low, high = recall_interval(ranks, 1)
    return 100.0 * float(np.mean(ranks == 1)), low, high, len(ranks)


def against_chance(low: float, high: float, chance: float = 50.0) -> str:
    """Where an interval of a percentage lies relative to ``chance``: above, below, or at chance
    (the interval holds it, so the run cannot tell the model from a coin flip)."""
    if low > chance:
        return "above chance"
    if high < chance:
        return "below chance"
    return "not distinguishable from chance"


def retrieval_verdict(method: str, metrics: dict, preferences: pd.DataFrame, ms_per_query: float | None = None) -> str:
    """A notebook's verdict in two sentences, computed from the run: ``method``'s text-to-image R@1
    with its 95% bootstrap interval over the queries (``metrics``: :func:`fastslow.metrics.evaluate`),
    its latency when timed, and how often it prefers the right image of a twin pair (chance: 50%)."""
    ranks = np.asarray(metrics["ranks"]["t2i"])
    low, high = recall_interval(ranks, 1)
    speed = f", at {ms_per_query:.2f} ms per query" if ms_per_query is not None else ""
    first = (f"{method}: text-to-image R@1 {metrics['t2i']['R@1']:.1f}% "
             f"(95% interval [{low:.1f}, {high:.1f}]) over {len(ranks)} queries{speed}.")
    share, low, high, captions = twin_share_interval(preferences)
    if captions == 0:
        return first + " No image of this gallery has a twin, so binding and relations are not tested here."
    return (first + f" It prefers the right image of a twin pair on {share:.1f}% of {captions} twin captions "
            f"(95% interval [{low:.1f}, {high:.1f}]): {against_chance(low, high)} (50%).")


# --- the order test against chance (notebook 06) -------------------------------------------------

CHANCE_VERDICTS = ("above chance", "not distinguishable from chance", "below chance")


def same_pick_share(preferences: pd.DataFrame, split: CaptionedImages) -> tuple[float, int]:
    """How often both captions of a twin pair pick the same item: ``(share in %, caption pairs)``.

    Caption j of an item and caption j of its twin form a caption pair (the same template, so the
    same words or one word apart); only pairs whose two captions are both rows of ``preferences``
    count. A pair picks the same item when one caption prefers its own item and the other its twin:
    the model ranks the two items the same way whatever the caption says, so exactly one of the two
    is right. A model that does so on every pair scores exactly 50%. ``(nan, 0)`` without pairs."""
    if preferences.empty:
        return float("nan"), 0
    first_caption = {int(i): int(j) for i, j in zip(*np.unique(split.caption_image, return_index=True))}
    position = [c - first_caption[i] for c, i in zip(preferences["caption_index"], preferences["image"])]
    picked = preferences["image"].where(preferences["prefers_own"], preferences["twin"])
    frame = pd.DataFrame({"pair": preferences[["image", "twin"]].min(axis=1), "position": position,
                          "picked": picked})
    counted = frame.groupby(["pair", "position"])["picked"].agg(["size", "nunique"])
    pairs = counted[counted["size"] == 2]
    if pairs.empty:
        return float("nan"), 0
    return 100.0 * float((pairs["nunique"] == 1).mean()), len(pairs)


def twin_chance_table(preferences: dict[str, pd.DataFrame], split: CaptionedImages,
                      chance: float = 50.0) -> pd.DataFrame:
    """The twin test against chance, one row per model and kind of twin (and ``all``): the share of
    twin captions on which the model prefers the right item with its 95% interval
    (:func:`twin_share_interval`), where the interval lies (:func:`against_chance`), and how often
    both captions of a pair pick the same item (:func:`same_pick_share`)."""
    rows = []
    for method, pref in preferences.items():
        parts = {kind: pref[pref["kind"] == kind] for kind in sorted(pref["kind"].unique())}
        for kind, part in (parts | {"all": pref}).items():
            share, low, high, captions = twin_share_interval(part)
            same, pairs = same_pick_share(part, split)
            verdict = against_chance(low, high, chance) if captions else "no twins"
            rows.append({"method": method, "kind": kind, "right (%)": share, "low": low, "high": high,
                         "captions": captions, "verdict": verdict, "caption pairs": pairs,
                         "same pick (%)": same})
    columns = ["method", "kind", "right (%)", "low", "high", "captions", "verdict", "caption pairs", "same pick (%)"]
    return pd.DataFrame(rows, columns=columns).set_index(["method", "kind"])


def chance_sentence(table: pd.DataFrame, kind: str = "all", chance: float = 50.0) -> str:
    """One sentence from :func:`twin_chance_table`: which models lie above, at or below chance on
    the twins of ``kind``, by their 95% intervals."""
    rows = table.xs(kind, level="kind") if len(table) else table
    if rows.empty or int(rows["captions"].max()) == 0:
        return f"{kind}: no twin captions in this gallery, so the test does not apply."
    groups = {verdict: list(rows.index[rows["verdict"] == verdict]) for verdict in CHANCE_VERDICTS}
    head = f"{kind} twins ({int(rows['captions'].max())} captions, 95% intervals against {chance:g}%): "
    filled = [verdict for verdict, methods in groups.items() if methods]
    if len(filled) == 1:
        who = f"all {len(rows)} models" if len(rows) > 1 else str(rows.index[0])
        return head + f"{who}: {filled[0]}."
    return head + "; ".join(f"{verdict}: {', '.join(groups[verdict]) or 'none'}" for verdict in CHANCE_VERDICTS) + "."
