"""Table 1 of a profile's study (notebook 05): BoVW and every trained DSI scored on the same test queries.

:func:`run` reads notebook 02's BoVW rows, scores the zero-shot and fine-tuned model of every database
(notebooks 03/04), and writes Table 1 and its bar chart into the profile's report;
:func:`verdict_lines` says, from the table, where a DSI beats BoVW.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import pandas as pd
from matplotlib.figure import Figure

from vitdsi_utils.data.database import databases
from vitdsi_utils.data.images import SIZES
from vitdsi_utils.evaluation import evaluate_dsi
from vitdsi_utils.ids.schemes import CODEC_SCHEMES
from vitdsi_utils.reports.paper import TABLE1_NOTE, attach_paper, table1_markdown
from vitdsi_utils.reports.plots import metric_bars, save_figure
from vitdsi_utils.reports.tables import BOVW_MODEL, ZERO_SHOT, write_table
from vitdsi_utils.runs import DSI_MODEL_FILES, StudyPaths, load_trained
from vitdsi_utils.studies.specs import ImageSourceSpec, check_choices, require_profile, spec_images
from vitdsi_utils.studies.targets import baseline_verdicts


@dataclass
class ResultsSpec(ImageSourceSpec):
    """Settings of notebook 05: the grid of databases whose models are scored, and the ranked lists' length."""

    size: int = field(default=160, metadata={"choices": SIZES})
    ns: tuple[int, ...] = (512, 1024, 2048)
    schemes: tuple[str, ...] = field(default=("clustered", "random"), metadata={"choices": CODEC_SCHEMES})
    seeds: tuple[int, ...] = (0,)
    k: int = 100

    #: notebook profile keys (05_results) -> spec keys
    PROFILE_KEYS = {
        **ImageSourceSpec.PROFILE_KEYS,
        "SIZE": "size",
        "NS": "ns",
        "ID_SCHEMES": "schemes",
        "SEEDS": "seeds",
        "K": "k",
    }

    def __post_init__(self) -> None:
        check_choices(self)


class ResultsResult(NamedTuple):
    """What :func:`run` returns: Table 1 (every row, the paper's numbers attached), its Markdown, its figure."""

    table1: pd.DataFrame
    markdown: str
    figures: dict[str, Figure]


def run(spec: ResultsSpec, paths: StudyPaths) -> ResultsResult:
    """Table 1 of ``paths``' profile: ``tables/table1`` (CSV and Markdown) and ``figures/metric_bars.png``.

    BoVW's rows are notebook 02's (``tables/bovw.csv``); each database's DSI models are loaded from
    its run folder and scored on its test queries (search time per query printed). A missing table
    or model is an error naming the command that makes it.
    """
    require_profile(paths, "05_results")
    image_set = spec_images(spec)
    name = image_set.name
    bovw_csv = paths.tables / "bovw.csv"
    if not bovw_csv.exists():
        raise FileNotFoundError(
            f"{bovw_csv} is missing: run `vitdsi study --profile {paths.profile} --dataset {spec.source} "
            "--start-at 02_bovw`"
        )
    frames = [pd.read_csv(bovw_csv).drop(columns="paper", errors="ignore")]
    for db in databases(image_set, spec.ns, spec.schemes, spec.seeds):
        run_dir, s = paths.run_dir(db), db.settings
        for model_name, file in DSI_MODEL_FILES:
            model, codec, meta = load_trained(run_dir / file, paths.profile, dataset=spec.source)
            table, timings = evaluate_dsi(model, codec, db, k=spec.k, seed=s["seed"])
            frames.append(
                table.assign(
                    model=model_name,
                    source=s["source"],
                    size=s["size"],
                    n=s["n"],
                    ids=s["id_scheme"],
                    seed=s["seed"],
                    epochs=meta["epoch"],
                    train_s=meta["extra"].get("seconds"),
                    **timings,
                )
            )
            print(
                f"{model_name}, N={s['n']} {s['id_scheme']} seed {s['seed']}: "
                f"{timings['search_ms_per_query']:.1f} ms per query"
            )
    results = attach_paper(pd.concat(frames, ignore_index=True))
    markdown = "\n\n".join(
        [f"{name} at {spec.size} px, profile `{paths.profile}`. " + TABLE1_NOTE, table1_markdown(results)]
    )
    write_table(results, paths.tables / "table1", markdown=markdown)
    figure = metric_bars(results, ("IA@1", "mAP@10", "P@10", "R@100"))
    save_figure(figure, paths.figures / "metric_bars.png")
    return ResultsResult(results, markdown, {"metric_bars": figure})


def verdict_lines(results: pd.DataFrame, metrics: tuple[str, ...] = ("mAP@10", "P@10")) -> list[str]:
    """Every DSI row against BoVW, per metric: better or worse only when the 95% intervals do not overlap;
    then how many database sizes some DSI wins, the range of zero-shot IA@1 and the largest
    clustered-random gap."""
    lines = []
    for metric in metrics:
        lines.append(metric)
        verdicts = baseline_verdicts(results, metric)
        for row in verdicts.itertuples():
            lines.append(
                f"  N={row.n} seed {row.seed}, {row.model} ({row.ids}): {row.value:.3f} "
                f"[{row.ci_low:.3f}, {row.ci_high:.3f}] vs BoVW {row.baseline_value:.3f} -> {row.verdict}"
            )
        wins = verdicts.groupby("n")["verdict"].apply(lambda v: (v == "better").any())
        lines.append(
            f"  {metric}: some DSI variant beats BoVW with non-overlapping intervals at "
            f"{int(wins.sum())} of {len(wins)} database sizes."
        )
    ia = results[(results["metric"] == "IA@1") & (results["model"] == ZERO_SHOT)]
    lines.append(
        f"Zero-shot IA@1: {ia['value'].min():.3f}-{ia['value'].max():.3f} (target of the project: >= 0.99 at every N)."
    )
    wide = results[results["model"] != BOVW_MODEL].pivot_table(
        index=["model", "n", "seed", "metric"], columns="ids", values="value"
    )
    if {"clustered", "random"} <= set(wide.columns):
        gap = (wide["clustered"] - wide["random"]).abs()
        lines.append(
            f"Largest clustered-random gap over all DSI metrics: {gap.max():.3f} ({' / '.join(map(str, gap.idxmax()))})."
        )
    return lines
