"""The dense-init study's report: its Table 1 rows and the project's targets 2-4 on every model it gathers.

:func:`target_tables` judges the targets of ``docs/protocol.md`` (:mod:`vitdsi_utils.studies.targets`);
:func:`target_markdowns` and :func:`target_lines` say the verdicts; :func:`dense_init_markdown` is the
report of a recipe's run (see :mod:`.dense_init`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from vitdsi_utils.baselines.dense import DENSE_MODEL
from vitdsi_utils.reports.paper import TABLE1_NOTE, attach_paper, table1_markdown
from vitdsi_utils.reports.tables import MULTITASK, write_csv, write_table
from vitdsi_utils.studies.targets import (
    beats_baseline,
    gap_markdown,
    gap_table,
    summarise,
    target3_markdown,
    target4_markdown,
    zero_shot_memorisation,
)

#: Row names of the two models of this variant in result tables.
INIT_ZERO_SHOT = "DSI zero-shot, dense init"
INIT_MULTITASK = "DSI multi-task, dense init"


def dense_init_markdown(results: pd.DataFrame, source: str, size: int) -> str:
    """Table 1 rows of the study, then the verdicts of targets 3 and 4."""

    lines = [
        f"# DSI with a dense-initialised encoder, trained multi-task, on {source} at {size} px",
        "",
        TABLE1_NOTE,
        "",
        table1_markdown(attach_paper(results)),
        "",
    ]
    target3 = target3_markdown(results, exclude=[DENSE_MODEL])
    if target3:
        lines += [target3, ""]
    target4 = target4_markdown(results[results["model"].isin([INIT_ZERO_SHOT, INIT_MULTITASK])])
    if target4:
        lines.append(target4)
    return "\n".join(lines)


def target_tables(results: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Targets 2-4 of ``docs/protocol.md`` on every model of ``results``, per database
    (:mod:`~vitdsi_utils.studies.targets`).

    ``target2``: zero-shot IA@1 of the paper's DSI and of the dense-init DSI; ``target3``: every DSI
    variant against BoVW (the dense search left out); ``target4``: the gaps of the dense-init DSI's
    ID schemes to its clustered IDs (no rows when it has no clustered IDs to compare with).
    """
    t2 = pd.concat(
        [
            zero_shot_memorisation(results).assign(model="DSI zero-shot"),
            zero_shot_memorisation(results, model=INIT_ZERO_SHOT).assign(model=INIT_ZERO_SHOT),
        ]
    )
    t3 = beats_baseline(results)
    t3 = t3[t3["model"] != DENSE_MODEL]
    init_rows = results[results["model"].isin([INIT_ZERO_SHOT, INIT_MULTITASK])]
    if "clustered" in set(init_rows["ids"]):
        t4 = gap_table(init_rows, reference="clustered")
    else:
        t4 = pd.DataFrame(columns=["model", "n", "seed", "ids", "max_abs_gap", "within_target", "not_worse"])
    return {"target2": t2, "target3": t3, "target4": t4}


def target_markdowns(targets: dict[str, pd.DataFrame]) -> list[str]:
    """The tables of :func:`target_tables` as Markdown: target 2 (paper IDs), 3 and 4, summarised."""
    t2 = targets["target2"]
    return [
        summarise(t2[t2["ids"].isin(["clustered", "random"])]).to_markdown(index=False),
        summarise(targets["target3"]).to_markdown(index=False),
        gap_markdown(targets["target4"])
        if len(targets["target4"])
        else "Target 4: no dense-init DSI with clustered IDs (INIT_SCHEMES) to compare with.",
    ]


def target_lines(targets: dict[str, pd.DataFrame]) -> list[str]:
    """The verdicts of :func:`target_tables`: target 2 for the paper's DSI, target 3 (and the dense-init
    DSI's margins per N), target 4 as written (two-sided) and one-sided."""
    t2, t3, t4 = targets["target2"], targets["target3"], targets["target4"]
    met3 = summarise(t3)
    met3 = met3[met3["met_everywhere"]]
    paper_t2 = t2[t2["ids"].isin(["clustered", "random"]) & (t2["model"] == "DSI zero-shot")]
    lines = [
        f"Target 2: {'met' if paper_t2['met'].all() else 'not met'} by the paper's DSI.",
        "Target 3: "
        + (
            "met by " + ", ".join(f"{r.model} ({r.ids})" for r in met3.itertuples())
            if len(met3)
            else "not met by any DSI variant at every N."
        ),
    ]
    for r in t3[t3["model"].isin([MULTITASK, INIT_MULTITASK])].to_dict("records"):  # 08's and this study's
        lines.append(
            f"  {r['model']} ({r['ids']}) N={r['n']}: IA@1 {r['IA@1']:.3f}; "
            f"mAP@10 low end {r['mAP@10 low']:.3f} vs BoVW high end {r['BoVW mAP@10 high']:.3f}; "
            f"P@10 low end {r['P@10 low']:.3f} vs BoVW high end {r['BoVW P@10 high']:.3f} -> "
            f"{'met' if r['met'] else 'not met'}"
        )
    t4_ok = summarise(t4, column="within_target")
    if t4_ok["met_everywhere"].any():
        verdict = "met by " + ", ".join(f"{r.model} ({r.ids})" for r in t4_ok[t4_ok["met_everywhere"]].itertuples())
    elif len(t4):
        verdict = f"not met; the smallest largest-gap is {t4['max_abs_gap'].min():.3f}"
    else:
        verdict = "no scheme to compare"
    lines.append(f"Target 4: {verdict}")
    if len(t4):
        one_sided = summarise(t4, column="not_worse")
        lines.append(
            "Target 4, one-sided (no metric more than 0.03 below clustered at every N): "
            + (", ".join(f"{r.model} ({r.ids})" for r in one_sided[one_sided["met_everywhere"]].itertuples()) or "none")
        )
    return lines


def write_recipe_tables(
    results: pd.DataFrame, histories: pd.DataFrame, facts: pd.DataFrame, out: Path, source: str, size: int
) -> None:
    """A recipe's files in ``out``: ``dsi_dense_init_<source>_<size>px`` (CSV, Markdown), its ``ids_`` and ``histories_``."""
    stem = f"dsi_dense_init_{source}_{size}px"
    write_table(attach_paper(results), out / stem, markdown=dense_init_markdown(results, source, size))
    write_table(facts, out / f"ids_{stem}")
    if len(histories):
        write_csv(histories, out / f"histories_{stem}.csv")
