"""The project's targets (``docs/protocol.md`` section 4), checked on result tables.

Every function takes the long result table the notebooks and CLI studies write (one row per
model, database and metric: columns ``model, ids, n, seed, metric, value, ci_low, ci_high``)
and returns one row per case with the numbers behind the verdict, so a reader sees by how much
a target is met or missed, not only whether.

* :func:`zero_shot_memorisation` - target 2: zero-shot IA@1 >= 0.99 at every N and ID scheme.
* :func:`beats_baseline` - target 3: a DSI variant with IA@1 >= 0.95 whose mAP@10 and P@10
  intervals lie above the baseline's (BoVW) at every N.
* target 4 (an ID scheme within 0.03 of clustered IDs on every metric) is
  :func:`vitdsi_utils.id_study.gap_table`; :func:`summarise` reads its ``within_target`` column,
  and :func:`target4_markdown` gives its Markdown section.

"Above" means that the lower end of the model's 95% bootstrap interval is above the upper end
of the baseline's; overlapping intervals are not a win.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

__all__ = [
    "beats_baseline",
    "summarise",
    "target3_markdown",
    "target4_markdown",
    "zero_shot_memorisation",
]

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
        base = base.rename(columns={"value": f"{baseline} {metric}", "ci_low": f"{baseline} {metric} low",
                                    "ci_high": f"{baseline} {metric} high"})
        ours = rows.rename(columns={"value": metric, "ci_low": f"{metric} low", "ci_high": f"{metric} high"})
        table = table.merge(ours, on=_KEYS, how="inner").merge(base, on=["n", "seed"], how="inner")
        verdict = np.where(table[f"{metric} low"] > table[f"{baseline} {metric} high"], "better",
                           np.where(table[f"{metric} high"] < table[f"{baseline} {metric} low"], "worse", "overlap"))
        table[f"{metric} verdict"] = verdict
    verdicts = table[[f"{metric} verdict" for metric in metrics]]
    table = table.assign(met=(table["IA@1"] >= min_ia) & (verdicts == "better").all(axis=1))
    return table.sort_values(["model", "ids", "n", "seed"]).reset_index(drop=True)


def summarise(per_database: pd.DataFrame, by: Sequence[str] = ("model", "ids"), column: str = "met") -> pd.DataFrame:
    """Whether a target holds at every database, per ``by`` group.

    ``column`` holds the per-database verdict (``met`` here, ``within_target`` in
    :func:`~vitdsi_utils.id_study.gap_table`). Columns: the ``by`` keys, n_databases, Ns (the
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
    lines = [f"## Target 3: IA@1 >= 0.95 and disjoint intervals above {baseline} on mAP@10 and P@10", "",
             f"| model | IDs | N | IA@1 | mAP@10 vs {baseline} | P@10 vs {baseline} | met |", "|---|---|---|---|---|---|---|"]
    for r in verdicts.to_dict("records"):
        lines.append(
            f"| {r['model']} | {r['ids']} | {r['n']} | {r['IA@1']:.3f} "
            f"| {r['mAP@10']:.3f} [{r['mAP@10 low']:.3f}, {r['mAP@10 high']:.3f}] vs {r[f'{baseline} mAP@10 high']:.3f} (upper) "
            f"| {r['P@10']:.3f} [{r['P@10 low']:.3f}, {r['P@10 high']:.3f}] vs {r[f'{baseline} P@10 high']:.3f} (upper) "
            f"| {'yes' if r['met'] else 'no'} |")
    return "\n".join(lines)


def target4_markdown(dsi_results: pd.DataFrame, *, reference: str = "clustered") -> str:
    """Target 4 as a Markdown section: each ID scheme minus ``reference`` ('' unless both are there).

    ``dsi_results`` holds the DSI rows only (baselines have no ID scheme to compare).
    """
    from .id_study import gap_markdown, gap_table

    if reference not in set(dsi_results["ids"]) or dsi_results["ids"].nunique() < 2:
        return ""
    return "\n".join([f"## Target 4: each scheme minus {reference} IDs (point estimates)", "",
                       gap_markdown(gap_table(dsi_results, reference=reference))])
