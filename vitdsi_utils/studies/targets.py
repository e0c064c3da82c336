"""The project's targets (``docs/protocol.md`` section 4), checked on result tables.

Every function takes the long result table the notebooks and CLI studies write (one row per
model, database and metric: columns ``model, ids, n, seed, metric, value, ci_low, ci_high``)
and returns one row per case with the numbers behind the verdict, so a reader sees by how much
a target is met or missed, not only whether.

* :func:`zero_shot_memorisation` - target 2: zero-shot IA@1 >= 0.99 at every N and ID scheme.
* :func:`beats_baseline` - target 3: a DSI variant with IA@1 >= 0.95 whose mAP@10 and P@10
  intervals lie above the baseline's (BoVW) at every N.
* target 4 (an ID scheme within 0.03 of clustered IDs on every metric) is
  :func:`vitdsi_utils.studies.targets.gap_table`; :func:`summarise` reads its ``within_target`` column,
  and :func:`target4_markdown` gives its Markdown section.

"Above" means that the lower end of the model's 95% bootstrap interval is above the upper end
of the baseline's; overlapping intervals are not a win.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from vitdsi_utils.reports.tables import FINE_TUNED, MULTITASK, ZERO_SHOT

_KEYS = ["model", "ids", "n", "seed"]


_REQUIRED = {"model", "ids", "n", "seed", "metric", "value", "ci_low", "ci_high"}


def _check(results: pd.DataFrame) -> pd.DataFrame:
    missing = _REQUIRED - set(results.columns)
    if missing:
        raise ValueError(
            f"the result table lacks the columns {sorted(missing)}; pass the long table the studies write "
            "(one row per model, database and metric)"
        )
    return results


def _wide(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    rows = results[results["metric"] == metric][_KEYS + ["value", "ci_low", "ci_high"]]
    if rows.duplicated(_KEYS).any():
        dupes = rows[rows.duplicated(_KEYS, keep=False)][_KEYS].drop_duplicates().to_dict("records")
        raise ValueError(f"{metric} appears more than once for {dupes[:3]}; drop the repeated rows first")
    return rows


def zero_shot_memorisation(
    results: pd.DataFrame, *, model: str = "DSI zero-shot", threshold: float = 0.99
) -> pd.DataFrame:
    """Target 2: IA@1 of ``model`` per N and ID scheme against ``threshold``.

    Columns: ids, n, seed, IA@1, ci_low, ci_high, met.
    """
    rows = _wide(_check(results), "IA@1")
    rows = rows[rows["model"] == model].rename(columns={"value": "IA@1"})
    rows = rows.assign(met=rows["IA@1"] >= threshold)
    return rows.drop(columns="model").sort_values(["n", "ids", "seed"]).reset_index(drop=True)


def beats_baseline(
    results: pd.DataFrame,
    *,
    baseline: str = "BoVW",
    metrics: Sequence[str] = ("mAP@10", "P@10"),
    min_ia: float = 0.95,
) -> pd.DataFrame:
    """Target 3: every model with an IA@1 row against ``baseline`` on ``metrics``, per database.

    One row per (model, ids, n, seed) with IA@1, for each metric the model's value and interval
    and the baseline's, a per-metric verdict ('better', 'worse' or 'overlap'), and ``met``:
    IA@1 >= ``min_ia`` and 'better' on every metric. Databases without a baseline row are left out.
    """
    results = _check(results)
    ia = _wide(results, "IA@1").rename(columns={"value": "IA@1"})[_KEYS + ["IA@1"]]
    table = ia[ia["model"] != baseline]
    for metric in metrics:
        rows = _wide(results, metric)
        base = rows[rows["model"] == baseline][["n", "seed", "value", "ci_low", "ci_high"]]
        base = base.rename(
            columns={
                "value": f"{baseline} {metric}",
                "ci_low": f"{baseline} {metric} low",
                "ci_high": f"{baseline} {metric} high",
            }
        )
        ours = rows.rename(columns={"value": metric, "ci_low": f"{metric} low", "ci_high": f"{metric} high"})
        table = table.merge(ours, on=_KEYS, how="inner").merge(base, on=["n", "seed"], how="inner")
        verdict = np.where(
            table[f"{metric} low"] > table[f"{baseline} {metric} high"],
            "better",
            np.where(table[f"{metric} high"] < table[f"{baseline} {metric} low"], "worse", "overlap"),
        )
        table[f"{metric} verdict"] = verdict
    verdicts = table[[f"{metric} verdict" for metric in metrics]]
    table = table.assign(met=(table["IA@1"] >= min_ia) & (verdicts == "better").all(axis=1))
    return table.sort_values(["model", "ids", "n", "seed"]).reset_index(drop=True)


def summarise(per_database: pd.DataFrame, by: Sequence[str] = ("model", "ids"), column: str = "met") -> pd.DataFrame:
    """Whether a target holds at every database, per ``by`` group.

    ``column`` holds the per-database verdict (``met`` here, ``within_target`` in
    :func:`~vitdsi_utils.studies.targets.gap_table`). Columns: the ``by`` keys, n_databases, Ns (the
    database sizes seen), met_at (how many databases meet it) and met_everywhere.
    """
    if column not in per_database.columns:
        raise ValueError(f"no {column!r} column; pass the table a target function returned, or name its verdict column")
    groups = per_database.groupby(list(by), sort=True)
    return groups.agg(
        n_databases=(column, "size"),
        Ns=("n", lambda s: ", ".join(str(v) for v in sorted(set(s)))),
        met_at=(column, "sum"),
        met_everywhere=(column, "all"),
    ).reset_index()


def target3_markdown(results: pd.DataFrame, *, exclude: Sequence[str] = (), baseline: str = "BoVW") -> str:
    """Target 3's verdict per model and database as a Markdown section ('' without baseline rows).

    ``exclude`` names models left out (e.g. the dense baseline, which is not a DSI).
    """
    verdicts = beats_baseline(results, baseline=baseline)
    verdicts = verdicts[~verdicts["model"].isin(list(exclude))]
    if not len(verdicts):
        return ""
    lines = [
        f"## Target 3: IA@1 >= 0.95 and disjoint intervals above {baseline} on mAP@10 and P@10",
        "",
        f"| model | IDs | N | IA@1 | mAP@10 vs {baseline} | P@10 vs {baseline} | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in verdicts.to_dict("records"):
        lines.append(
            f"| {r['model']} | {r['ids']} | {r['n']} | {r['IA@1']:.3f} "
            f"| {r['mAP@10']:.3f} [{r['mAP@10 low']:.3f}, {r['mAP@10 high']:.3f}] vs {r[f'{baseline} mAP@10 high']:.3f} (upper) "
            f"| {r['P@10']:.3f} [{r['P@10 low']:.3f}, {r['P@10 high']:.3f}] vs {r[f'{baseline} P@10 high']:.3f} (upper) "
            f"| {'yes' if r['met'] else 'no'} |"
        )
    return "\n".join(lines)


def target4_markdown(dsi_results: pd.DataFrame, *, reference: str = "clustered") -> str:
    """Target 4 as a Markdown section: each ID scheme minus ``reference`` ('' unless both are there).

    ``dsi_results`` holds the DSI rows only (baselines have no ID scheme to compare).
    """

    if reference not in set(dsi_results["ids"]) or dsi_results["ids"].nunique() < 2:
        return ""
    return "\n".join(
        [
            f"## Target 4: each scheme minus {reference} IDs (point estimates)",
            "",
            gap_markdown(gap_table(dsi_results, reference=reference)),
        ]
    )


#: The metrics the comparison reports, in column order.
METRICS = ("IA@1", "mAP@10", "P@10", "R@100")


MODEL_ORDER = {ZERO_SHOT: 0, FINE_TUNED: 1, MULTITASK: 2}


#: Target 4 of the study: random-ID DSI within this distance of clustered-ID DSI on every metric.
TARGET_GAP = 0.03


def ordered_by_scheme(frame: pd.DataFrame, schemes: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows by model (zero-shot first), N, seed and scheme (in the order given, else the table's own)."""
    schemes = list(schemes or dict.fromkeys(frame["ids"]))
    return (
        frame.assign(
            _m=frame["model"].map(MODEL_ORDER).fillna(9), _s=frame["ids"].map({s: i for i, s in enumerate(schemes)})
        )
        .sort_values(["_m", "n", "seed", "_s"])
        .drop(columns=["_m", "_s"])
    )


def gap_table(
    results: pd.DataFrame, reference: str = "clustered", metrics: Sequence[str] = METRICS, target: float = TARGET_GAP
) -> pd.DataFrame:
    """Each scheme minus ``reference`` on every metric, at the same model, N and seed.

    Columns: model, n, seed, ids, one signed difference per metric, ``max_abs_gap``,
    ``within_target`` (every metric within ``target`` of the reference, above or below: target 4
    of the study as written) and ``not_worse`` (no metric more than ``target`` *below* the
    reference: the one-sided reading, which a scheme that beats the reference also passes).
    Point estimates only: with a few hundred queries, differences under about 0.05 are inside the
    bootstrap intervals of either side.
    """
    rows = results[results["metric"].isin(metrics)]
    wide = rows.pivot_table(index=["model", "n", "seed", "ids"], columns="metric", values="value")
    wide = wide[[m for m in metrics if m in wide.columns]]
    if reference not in wide.index.get_level_values("ids"):
        raise ValueError(f"no {reference!r} rows to compare with; the table has {sorted(set(rows['ids']))}")
    ref = wide.xs(reference, level="ids")
    others = wide.drop(index=reference, level="ids")
    diff = others - ref.reindex(others.index.droplevel("ids")).to_numpy()
    diff["max_abs_gap"] = diff.abs().max(axis=1)
    diff["within_target"] = diff["max_abs_gap"] <= target
    diff["not_worse"] = diff[list(wide.columns)].min(axis=1) >= -target
    return ordered_by_scheme(diff.reset_index(), list(dict.fromkeys(results["ids"])))


def gap_markdown(gaps: pd.DataFrame, target: float = TARGET_GAP) -> str:
    """:func:`gap_table` as Markdown, differences signed (scheme minus the reference)."""
    metrics = [m for m in METRICS if m in gaps.columns]
    one_sided = "not_worse" in gaps.columns
    header = (
        "| model | N | seed | IDs | "
        + " | ".join(f"Δ {m}" for m in metrics)
        + f" | max abs Δ | within {target} |"
        + (f" no Δ below -{target} |" if one_sided else "")
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in gaps.to_dict("records"):
        deltas = " | ".join(f"{row[m]:+.3f}" for m in metrics)
        lines.append(
            f"| {row['model']} | {row['n']} | {row['seed']} | {row['ids']} | {deltas} "
            f"| {row['max_abs_gap']:.3f} | {'yes' if row['within_target'] else 'no'} |"
            + (f" {'yes' if row['not_worse'] else 'no'} |" if one_sided else "")
        )
    return "\n".join(lines)


def baseline_verdicts(results: pd.DataFrame, metric: str = "mAP@10", baseline: str = "BoVW") -> pd.DataFrame:
    """Every non-baseline model against the baseline on ``metric``, at the same N and seed.

    ``verdict`` is 'better' or 'worse' only when the two 95% intervals do not overlap, else
    'overlap'. Columns: n, seed, model, ids, value, ci_low, ci_high, baseline_value,
    baseline_ci_low, baseline_ci_high, verdict.
    """
    rows = results[results["metric"] == metric]
    base = rows[rows["model"] == baseline][["n", "seed", "value", "ci_low", "ci_high"]]
    base = base.rename(columns={c: f"baseline_{c}" for c in ("value", "ci_low", "ci_high")})
    ours = rows[rows["model"] != baseline][["n", "seed", "model", "ids", "value", "ci_low", "ci_high"]]
    merged = ours.merge(base, on=["n", "seed"], how="inner")
    verdict = np.where(
        merged["ci_low"] > merged["baseline_ci_high"],
        "better",
        np.where(merged["ci_high"] < merged["baseline_ci_low"], "worse", "overlap"),
    )
    return merged.assign(verdict=verdict).sort_values(["n", "seed", "model", "ids"]).reset_index(drop=True)
