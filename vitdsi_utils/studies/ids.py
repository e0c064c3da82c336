"""The comparison of notebook 08_ids: DSI trained with every ID scheme on the same databases.

For each N and seed, one database draw serves every scheme: the dense ``random`` and
``clustered`` IDs come from databases built with that scheme (as in notebooks 03-05, whose run
folders they share), and ``semantic``, ``rq`` and ``atomic`` IDs are assigned to the indexed
images of the ``random`` build (the same images in the same roles; only the row order differs,
which these schemes do not depend on). Each scheme gets its own run folder, named by its
:attr:`~vitdsi_utils.ids.schemes.IDAssignment.tag`.

:func:`compare_id_schemes` trains (or loads) and scores the models; :func:`ids_markdown`,
:func:`~vitdsi_utils.studies.targets.gap_table` and :func:`id_scheme_bars` turn the results into
the notebook's tables and figure. :func:`run` does all of it for an :class:`IdsSpec` (a notebook
profile's study; no recipe runs it) and writes the notebook's tables and figure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from vitdsi_utils.data.database import database_with_ids
from vitdsi_utils.data.images import SIZES, ImageSet, dataset_name
from vitdsi_utils.ids.schemes import CODEC_SCHEMES, sibling_agreement
from vitdsi_utils.model.decoding import invalid_id_rates
from vitdsi_utils.phases import TARGET_MODES
from vitdsi_utils.reports.plots import save_figure
from vitdsi_utils.reports.tables import (
    FINE_TUNED,
    MULTITASK,
    ZERO_SHOT,
    format_number,
    metric_cell,
    with_uninformative_note,
    write_csv,
    write_table,
)
from vitdsi_utils.runs import StudyPaths, run_name
from vitdsi_utils.studies.dsi import run_experiment
from vitdsi_utils.studies.specs import (
    ImageSourceSpec,
    ModelSpec,
    check_choices,
    dsi_model,
    no_pooling,
    require_profile,
    spec_images,
)
from vitdsi_utils.studies.targets import METRICS, MODEL_ORDER, TARGET_GAP, gap_markdown, gap_table, ordered_by_scheme
from vitdsi_utils.training.config import TrainConfig

#: Bar colours of the schemes (others get matplotlib's cycle).
SCHEME_COLORS = {
    "clustered": "#1f4e9c",
    "random": "#7fa6e0",
    "semantic": "#2ca02c",
    "rq": "#9467bd",
    "atomic": "#c25a0b",
}


def compare_id_schemes(
    image_set: ImageSet,
    ns: Iterable[int],
    schemes: Sequence[str],
    seeds: Iterable[int],
    *,
    runs_dir: str | Path,
    index_config: Callable[[int], TrainConfig],
    retrieval_config: Callable[[int], TrainConfig],
    model_overrides: dict | None = None,
    max_pairs_per_query: int | None = None,
    k: int = 100,
    id_params: dict | None = None,
    fine_tune_phase: bool = True,
    multitask_config: Callable[[int], TrainConfig] | None = None,
    mix_ratio: float | None = None,
    multitask_targets: str = "pairs",
    log: Callable[[str], None] | None = print,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Index, fine-tune and score one DSI per (N, seed, scheme); return (results, runs, histories).

    ``index_config(seed)`` / ``retrieval_config(seed)`` give the training settings of a seed.
    ``id_params`` go to :func:`~vitdsi_utils.ids.schemes.assign_ids` (k, c, levels,
    codebook_size, bovw_words). Finished phases in ``runs_dir`` are loaded, not retrained.
    ``multitask_config(seed)`` adds the multi-task model of each zero-shot one (indexing examples
    in every epoch beside ``mix_ratio`` retrieval examples per indexed image; ``multitask_targets``
    ``"same-class"`` redraws each query's target every epoch, see
    :func:`~vitdsi_utils.phases.fine_tune`); ``fine_tune_phase=False`` leaves out the plain
    fine-tuned model, which always trains on fixed pairs (those of notebooks 03/04, so their models are reused).

    * ``results``: the long metric table of :func:`~vitdsi_utils.studies.dsi.run_experiment`
      (model, n, ids, seed, metric, value, ci_low, ci_high, chance, ...);
    * ``runs``: one row per (N, seed, scheme, model) with the IDs' facts (tag, base, vocabulary,
      ID lengths, collision rate, time to assign them, sibling class agreement and its chance
      level), the invalid-ID rates of constrained beam search and of free greedy decoding on
      the test queries, epochs and training seconds;
    * ``histories``: the per-epoch training curves of every run.
    """
    runs_dir = Path(runs_dir)
    results, runs, histories = [], [], []
    for n in ns:
        for seed in seeds:
            for scheme in schemes:
                db, assignment = database_with_ids(image_set, n, scheme, seed=seed, **(id_params or {}))
                run_dir = runs_dir / run_name(db, assignment.tag)
                experiment = run_experiment(
                    db,
                    model_overrides=model_overrides,
                    index_config=index_config(seed),
                    retrieval_config=retrieval_config(seed),
                    run_dir=run_dir,
                    k=k,
                    max_pairs_per_query=max_pairs_per_query,
                    codec=assignment.codec,
                    ids=scheme,
                    fine_tune_phase=fine_tune_phase,
                    multitask=multitask_config is not None,
                    multitask_config=multitask_config(seed) if multitask_config is not None else None,
                    mix_ratio=mix_ratio,
                    multitask_targets=multitask_targets,
                )
                results.append(experiment.table)
                agreement, chance = sibling_agreement(assignment.codec, db.index_labels)
                test_images = db.split("test")[0]
                phases = [
                    (ZERO_SHOT, experiment.zero_shot),
                    (FINE_TUNED, experiment.fine_tuned),
                    (MULTITASK, experiment.multitask),
                ]
                phases = [(name, phase) for name, phase in phases if phase is not None]
                for name, phase in phases:
                    rates = invalid_id_rates(phase.model, assignment.codec, test_images)
                    runs.append(
                        {
                            "model": name,
                            "n": n,
                            "seed": seed,
                            **assignment.summary(),
                            "sibling_agreement": agreement,
                            "sibling_chance": chance,
                            "invalid_beam": rates["beam"],
                            "invalid_greedy": rates["greedy"],
                            "epochs": phase.epochs,
                            "epoch_cap": phase.epoch_cap,
                            "reached_target": phase.reached_target,
                            "train_s": phase.seconds,
                            "loaded": phase.loaded,
                        }
                    )
                    if len(phase.history):
                        histories.append(phase.history.to_frame().assign(n=n, ids=scheme, seed=seed))
                if log is not None:
                    ia = experiment.table.query("model == @ZERO_SHOT and metric == 'IA@1'")["value"].iloc[0]
                    mean_len = assignment.summary()["mean_length"]
                    later = [
                        f"{label} {phase.seconds:.0f} s" + (" (loaded)" if phase.loaded else "")
                        for label, phase in (
                            ("fine-tuning", experiment.fine_tuned),
                            ("multi-task", experiment.multitask),
                        )
                        if phase is not None
                    ]
                    log(
                        f"N={n} seed {seed} {assignment.tag}: {len(assignment.codec)} IDs of {mean_len:.2f} tokens, "
                        f"collisions {assignment.collision_rate:.3f}; indexing {experiment.zero_shot.epochs} epochs "
                        f"{experiment.zero_shot.seconds:.0f} s, zero-shot IA@1 {ia:.3f}"
                        + "".join(f"; {part}" for part in later)
                    )
    history_frame = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    return pd.concat(results, ignore_index=True), pd.DataFrame(runs), history_frame


def ids_markdown(results: pd.DataFrame, runs: pd.DataFrame, schemes: Sequence[str] | None = None) -> str:
    """The comparison as one Markdown table: metrics with 95% intervals, then the IDs' facts per row."""
    header = (
        "| model | N | IDs | seed | IA@1 | mAP@10 | P@10 | R@100 | ID tokens (mean / max) | vocabulary "
        "| collisions | sibling class agreement (chance) | invalid IDs: beam / free greedy | train s |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for run in ordered_by_scheme(runs, schemes).itertuples(index=False):
        rows = results[
            (results["model"] == run.model)
            & (results["n"] == run.n)
            & (results["ids"] == run.ids)
            & (results["seed"] == run.seed)
        ].set_index("metric")

        def cell(metric: str, rows: pd.DataFrame = rows) -> str:
            if metric not in rows.index:
                return "–"
            return metric_cell(rows.loc[metric])

        lines.append(
            f"| {run.model} | {run.n} | {run.ids} | {run.seed} | {cell('IA@1')} | {cell('mAP@10')} | {cell('P@10')} "
            f"| {cell('R@100')} | {run.mean_length:.2f} / {run.max_length} | {run.vocab_size} "
            f"| {run.collision_rate:.3f} | {format_number(run.sibling_agreement, 2)} ({run.sibling_chance:.2f}) "
            f"| {run.invalid_beam:.3f} / {run.invalid_greedy:.3f} | {run.train_s:.0f} |"
        )
    chance = results[results["metric"].isin(["P@10", "R@100"])].groupby(["n", "metric"])["chance"].first()
    notes = ", ".join(f"{metric} {value:.3f} at N={n}" for (n, metric), value in chance.items())
    return with_uninformative_note("\n".join(lines) + f"\n\nChance levels of a random ranking: {notes}.")


def id_scheme_bars(
    results: pd.DataFrame, metrics: Sequence[str] = METRICS, schemes: Sequence[str] | None = None
) -> Figure:
    """One panel per metric: a bar per scheme for each (model, N), 95% intervals, chance dashed; seeds averaged."""
    columns = ["value", "ci_low", "ci_high", "chance"]
    table = (
        results[results["metric"].isin(metrics)]
        .groupby(["model", "n", "ids", "metric"], as_index=False)[columns]
        .mean()
    )
    schemes = list(schemes or dict.fromkeys(results["ids"]))
    groups = sorted(set(zip(table["model"], table["n"])), key=lambda g: (MODEL_ORDER.get(g[0], 9), g[1]))
    width = 0.8 / max(len(schemes), 1)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.8 * len(metrics), 3.6), squeeze=False)
    plt.close(fig)  # shown only when a notebook cell returns it
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes[0], metrics):
        rows = table[table["metric"] == metric].set_index(["model", "n", "ids"])
        for j, scheme in enumerate(schemes):
            color = SCHEME_COLORS.get(scheme, cycle[j % len(cycle)])
            for i, (model, n) in enumerate(groups):
                if (model, n, scheme) not in rows.index:
                    continue
                r = rows.loc[(model, n, scheme)]
                x = i - 0.4 + width * (j + 0.5)
                ax.bar(
                    x,
                    r["value"],
                    width,
                    color=color,
                    label=scheme if i == 0 else None,
                    yerr=[[r["value"] - r["ci_low"]], [r["ci_high"] - r["value"]]],
                    error_kw={"capsize": 2, "elinewidth": 1},
                )
                if pd.notna(r["chance"]):
                    ax.hlines(r["chance"], x - width / 2, x + width / 2, colors="k", linestyles="dashed", linewidth=1)
        short = {ZERO_SHOT: "zero-shot", FINE_TUNED: "fine-tuned", MULTITASK: "multi-task"}
        ax.set_xticks(range(len(groups)), labels=[f"{short.get(m, m)}\nN={n}" for m, n in groups], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color="k", ls="--", lw=1))
    labels.append("chance")
    fig.legend(
        handles,
        labels,
        loc="lower center",
        ncols=min(len(labels), 6),
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.5, -0.02),
    )
    fig.suptitle("DSI by ID scheme: indexing and retrieval with 95% intervals")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def describe_gaps(gaps: pd.DataFrame, reference: str = "clustered", target: float = TARGET_GAP) -> list[str]:
    """Sentences computed from :func:`gap_table`: per scheme and model, the largest gap and the target verdict."""
    lines = []
    for (model, ids), group in gaps.groupby(["model", "ids"], sort=False):
        worst = group.loc[group["max_abs_gap"].idxmax()]
        hits = int(group["within_target"].sum())
        lines.append(
            f"{model}, {ids}: largest gap to {reference} {worst['max_abs_gap']:.3f} (N={worst['n']}); "
            f"within {target} on every metric in {hits} of {len(group)} database(s)."
        )
    return lines


# ------------------------------------------------------------------------------------------
# The study as a spec (notebook 08)
# ------------------------------------------------------------------------------------------
@dataclass
class IdsSpec(ImageSourceSpec):
    """Settings of the ID-scheme comparison (notebook 08; a notebook profile's study, no recipe runs it).

    Every N of ``ns`` x seed x scheme of ``schemes`` is one DSI, indexed (``index``), scored zero-shot,
    fine-tuned on fixed pairs (``fine_tune``; ``fine_tune_phase`` false: no plain fine-tuned model) and,
    with ``multitask_epochs``, trained multi-task from the same zero-shot model for that many epochs with
    ``fine_tune``'s other settings (``mix_ratio`` retrieval examples per indexed image and epoch,
    ``targets``). The training sections' seed is each database's seed. ``semantic_k``/``semantic_c``
    shape the semantic IDs, ``rq_levels``/``rq_codebook`` the RQ IDs, both over BoVW histograms of
    ``bovw_words`` words.
    """

    size: int = field(default=64, metadata={"choices": SIZES})
    ns: tuple[int, ...] = (512,)
    schemes: tuple[str, ...] = field(
        default=("clustered", "random", "semantic", "rq", "atomic"), metadata={"choices": CODEC_SCHEMES}
    )
    seeds: tuple[int, ...] = (0,)
    model: ModelSpec = field(default_factory=dsi_model)
    index: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=400, target_accuracy=0.99, lr=1e-3, warmup_steps=100)
    )
    fine_tune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=1e-3))
    fine_tune_phase: bool = True  # the plain fine-tuned model of every scheme
    multitask_epochs: int | None = None  # the multi-task model's epochs (null or 0: no multi-task model)
    mix_ratio: float | None = 2.0
    targets: str = field(default="pairs", metadata={"choices": TARGET_MODES})  # the multi-task model's
    max_pairs_per_query: int | None = 5
    k: int = 100  # the length of the ranked lists scored
    semantic_k: int = 10  # semantic IDs: k-means branching factor
    semantic_c: int = 10  # semantic IDs: leaf size
    rq_levels: int = 3  # RQ IDs: codebooks
    rq_codebook: int = 16  # RQ IDs: codewords per codebook
    bovw_words: int = 200  # the embeddings of semantic and RQ IDs: BoVW histograms of this many words

    #: notebook profile keys (08_ids) -> spec keys
    PROFILE_KEYS = {
        **ImageSourceSpec.PROFILE_KEYS,
        "SIZE": "size",
        "IDS_NS": "ns",
        "IDS_SCHEMES": "schemes",
        "SEEDS": "seeds",
        **ModelSpec.PROFILE_KEYS,
        "LR": ("index.lr", "fine_tune.lr"),
        "BATCH_SIZE": ("index.batch_size", "fine_tune.batch_size"),
        "WARMUP_STEPS": "index.warmup_steps",
        "INDEX_EPOCHS": "index.epochs",
        "TARGET_ACCURACY": "index.target_accuracy",
        "RETRIEVAL_EPOCHS": "fine_tune.epochs",
        "MAX_PAIRS_PER_QUERY": "max_pairs_per_query",
        "BOVW_WORDS": "bovw_words",
        "K": "k",
        "IDS_K": "semantic_k",
        "IDS_C": "semantic_c",
        "IDS_RQ_LEVELS": "rq_levels",
        "IDS_RQ_CODEBOOK": "rq_codebook",
        "IDS_FINE_TUNE": "fine_tune_phase",
        "IDS_MULTITASK_EPOCHS": "multitask_epochs",
        "IDS_MIX_RATIO": "mix_ratio",
        "IDS_TARGETS": "targets",
    }

    def __post_init__(self) -> None:
        check_choices(self)
        no_pooling(self)

    def index_config(self, seed: int) -> TrainConfig:
        """The indexing settings of the databases drawn with ``seed`` (no progress bar)."""
        return replace(self.index, seed=seed, progress=False)

    def retrieval_config(self, seed: int) -> TrainConfig:
        """The plain fine-tuning settings of the databases drawn with ``seed`` (no progress bar)."""
        return replace(self.fine_tune, seed=seed, progress=False)

    def multitask_config(self, seed: int) -> TrainConfig:
        """The multi-task model's settings: ``fine_tune``'s with ``multitask_epochs`` epochs."""
        return replace(self.fine_tune, epochs=self.multitask_epochs, seed=seed, progress=False)


class IdsResult(NamedTuple):
    """What :func:`run` returns: the tables it wrote (by file stem: ``ids``, ``ids_runs``, ``histories_ids``,
    ``ids_gaps``), their Markdown (``ids``, ``ids_gaps``), the figure (``ids_bars``) and the verdict lines."""

    tables: dict[str, pd.DataFrame]
    markdown: dict[str, str]
    figures: dict[str, Figure]
    lines: list[str]


def run(spec: IdsSpec, paths: StudyPaths) -> IdsResult:
    """Train (or load) and score one DSI per N, seed and scheme of ``spec`` into the profile's run folders.

    Writes ``tables/histories_ids.csv``, ``tables/ids`` (the comparison, CSV and Markdown),
    ``tables/ids_runs`` (the IDs' facts per model), ``figures/ids_bars.png`` and, when ``clustered``
    is among the schemes, ``tables/ids_gaps`` (each scheme minus clustered, target 4). The random
    and clustered models are notebooks 03/04's when the settings agree, so they are loaded.
    """
    require_profile(paths, "08_ids")
    image_set = spec_images(spec)
    schemes = list(spec.schemes)
    id_params = dict(
        k=spec.semantic_k,
        c=spec.semantic_c,
        levels=spec.rq_levels,
        codebook_size=spec.rq_codebook,
        bovw_words=spec.bovw_words,
    )
    results, runs, histories = compare_id_schemes(
        image_set,
        spec.ns,
        schemes,
        spec.seeds,
        runs_dir=paths.runs,
        index_config=spec.index_config,
        retrieval_config=spec.retrieval_config,
        model_overrides=spec.model.overrides(),
        max_pairs_per_query=spec.max_pairs_per_query,
        k=spec.k,
        id_params=id_params,
        fine_tune_phase=spec.fine_tune_phase,
        multitask_config=spec.multitask_config if spec.multitask_epochs else None,
        mix_ratio=spec.mix_ratio,
        multitask_targets=spec.targets,
    )
    write_csv(histories, paths.tables / "histories_ids.csv")
    name = dataset_name(spec.source, spec.root, spec.name)
    settings = (
        f"DSI by ID scheme, {name} at {spec.size} px, profile `{paths.profile}`; semantic and RQ IDs from BoVW "
        f"embeddings ({spec.bovw_words} words, tf-idf); k = {spec.semantic_k}, c = {spec.semantic_c}; "
        f"RQ {spec.rq_levels} levels x {spec.rq_codebook} codewords."
    )
    if spec.multitask_epochs:
        settings += (
            f" Multi-task: {spec.multitask_epochs} epochs, every indexed image beside {spec.mix_ratio:g} retrieval "
            f"examples per indexed image and epoch, targets `{spec.targets}`."
        )
    markdown = {"ids": "\n\n".join([settings, ids_markdown(results, runs, schemes)])}
    write_table(results, paths.tables / "ids", markdown=markdown["ids"])
    write_table(runs, paths.tables / "ids_runs")
    figure = id_scheme_bars(results, schemes=schemes)
    save_figure(figure, paths.figures / "ids_bars.png")
    tables = {"ids": results, "ids_runs": runs, "histories_ids": histories}
    if "clustered" in schemes:
        gaps = gap_table(results, reference="clustered")
        markdown["ids_gaps"] = gap_markdown(gaps)
        write_table(gaps, paths.tables / "ids_gaps", markdown=markdown["ids_gaps"])
        tables["ids_gaps"] = gaps
        lines = describe_gaps(gaps)
    else:
        lines = ["IDS_SCHEMES has no clustered run to compare with."]
    return IdsResult(tables, markdown, {"ids_bars": figure}, lines)
