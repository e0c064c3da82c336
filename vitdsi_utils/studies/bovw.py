"""The BoVW study (notebook 02): the classical baseline at every N, averaged over vocabularies, and VLAD beside it.

:func:`run` runs a :class:`BoVWSpec`: for a recipe, one table per vocabulary size (and the VLAD
comparison); for a notebook profile, its ``tables/bovw`` and ``tables/vlad`` and ``figures/bovw_vs_n.png``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from vitdsi_utils.bovw import BoVW
from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import SIZES, dataset_name, load_images
from vitdsi_utils.evaluation import bovw_variant, evaluate_bovw
from vitdsi_utils.reports.paper import TABLE1_NOTE, attach_paper, table1_markdown
from vitdsi_utils.reports.plots import metric_vs_n, save_figure
from vitdsi_utils.reports.tables import (
    BOVW_MODEL,
    VLAD_MODEL,
    format_number,
    metric_cell,
    with_uninformative_note,
    write_table,
)
from vitdsi_utils.runs import StudyPaths, database_name
from vitdsi_utils.studies.specs import ImageSourceSpec, SpecError, check_choices, refuse_profile_only
from vitdsi_utils.studies.targets import baseline_verdicts

#: Visual words when ``words`` is not given: the paper's 200 for histograms, fewer for VLAD (K x 128 values).
BOVW_WORDS, VLAD_WORDS = 200, 64


@dataclass
class BoVWSpec(ImageSourceSpec):
    """Settings of the BoVW study (recipe ``study: bovw``): one table per vocabulary size in ``words``.

    ``encoding: vlad`` encodes per-word sums of residuals (K x 128 values) instead of word histograms, and
    then also writes ``vlad_<source>_<size>px``: every VLAD table of the output folder beside plain BoVW
    with 200 words (run that first). ``power_norm`` null: on for VLAD, off for histograms.

    A notebook profile's study (notebook 02) runs plain BoVW with one vocabulary size (``words``) and VLAD
    with ``vlad_words`` beside it; ``name`` and ``vlad_words`` are read by it alone.
    """

    size: int = field(default=160, metadata={"choices": SIZES})
    ns: tuple[int, ...] = (512, 1024, 2048)
    seeds: tuple[int, ...] = (0,)
    words: tuple[int, ...] | None = None  # one run per value (null: 200, or 64 for VLAD)
    encoding: str = field(default="histogram", metadata={"choices": ("histogram", "vlad")})
    vocabularies: int = 5  # metrics averaged per query over this many k-means vocabularies
    rootsift: bool = False
    tfidf: bool = False  # tf-idf weighting of the histograms (not with VLAD)
    power_norm: bool | None = None  # signed square root of every component before L2
    intra_norm: bool = False  # VLAD: L2-normalise each word's block first
    vlad_words: int | None = None  # VLAD's words beside BoVW (a profile's study only; null: 64)

    #: settings only a notebook profile's study reads (a recipe that sets them is refused)
    PROFILE_ONLY = ("name", "vlad_words")

    #: notebook profile keys (02_bovw) -> spec keys
    PROFILE_KEYS = {
        **ImageSourceSpec.PROFILE_KEYS,
        "SIZE": "size",
        "NS": "ns",
        "SEEDS": "seeds",
        "BOVW_WORDS": "words",
        "BOVW_VOCABULARIES": "vocabularies",
        "VLAD_WORDS": "vlad_words",
    }

    def __post_init__(self) -> None:
        check_choices(self)
        for n_words in self.words or [BOVW_WORDS]:  # a bad combination fails before any run starts
            BoVW(
                n_words,
                encoding=self.encoding,
                rootsift=self.rootsift,
                tfidf=self.tfidf,
                power_normalisation=self.power_norm,
                intra_normalisation=self.intra_norm,
            )._check_params()


class BoVWResult(NamedTuple):
    """What a notebook profile's :func:`run` returns: its BoVW and VLAD rows, the figure, and the lines it reports."""

    bovw: pd.DataFrame
    vlad: pd.DataFrame
    figure: Figure
    verdicts: list[str]  # VLAD against BoVW on mAP@10, one line per (N, seed)
    precision: list[str]  # BoVW's P@10 against chance and its search time, one line per (N, seed)


def run(spec: BoVWSpec, paths: StudyPaths) -> tuple[list[pd.DataFrame], pd.DataFrame | None] | BoVWResult:
    """The BoVW study of ``spec``.

    With a notebook profile's paths (:meth:`StudyPaths.create`, notebook 02): :func:`_profile_study`, a
    :class:`BoVWResult`. Otherwise (a recipe) every vocabulary size of ``spec`` into ``paths.out``; (one
    result table per size, the VLAD comparison).
    """
    if paths.profile is not None:
        return _profile_study(spec, paths)
    refuse_profile_only(spec)
    vlad = spec.encoding == "vlad"
    frames = []
    for n_words in spec.words or [VLAD_WORDS if vlad else BOVW_WORDS]:
        frames.append(
            bovw_study(
                spec.source,
                spec.size,
                spec.ns,
                spec.seeds,
                paths.out,
                n_words=n_words,
                encoding=spec.encoding,
                rootsift=spec.rootsift,
                tfidf=spec.tfidf,
                power_normalisation=spec.power_norm,
                intra_normalisation=spec.intra_norm,
                vocabularies=spec.vocabularies,
                root=spec.root,
                annotations=spec.annotations,
            )
        )
    compared = vlad_comparison(paths.out, spec.source, spec.size) if vlad else None
    return frames, compared


#: The settings of a recipe's BoVW variants; a notebook profile's study runs plain BoVW and VLAD only.
RECIPE_VARIANT_SETTINGS = ("encoding", "rootsift", "tfidf", "power_norm", "intra_norm")


def _profile_study(spec: BoVWSpec, paths: StudyPaths) -> BoVWResult:
    """Notebook 02: plain BoVW with ``words`` and VLAD with ``vlad_words``, at every N and seed of ``spec``.

    Both average their metrics over ``vocabularies`` k-means vocabularies. Writes ``tables/bovw`` (Table 1's
    BoVW rows, which notebook 05 reads), ``tables/vlad`` and ``figures/bovw_vs_n.png`` into the profile's
    report; nothing else (no manifests, no per-variant tables).
    """
    defaults = {f.name: f.default for f in fields(spec)}
    changed = [name for name in RECIPE_VARIANT_SETTINGS if getattr(spec, name) != defaults[name]]
    if changed:
        raise SpecError(
            f"{changed[0]}: a notebook profile's BoVW study runs plain BoVW and VLAD; "
            "run other variants from a recipe (study: bovw)"
        )
    if spec.words is not None and len(spec.words) != 1:
        raise SpecError(f"words: a notebook profile's BoVW study takes one vocabulary size, got {list(spec.words)}")
    words = spec.words[0] if spec.words else BOVW_WORDS
    vlad_words = spec.vlad_words if spec.vlad_words is not None else VLAD_WORDS
    name = dataset_name(spec.source, spec.root, spec.name)
    common = dict(vocabularies=spec.vocabularies, root=spec.root, annotations=spec.annotations, progress=False)

    bovw = bovw_study(spec.source, spec.size, spec.ns, spec.seeds, out_dir=None, n_words=words, **common)
    averaged = (
        f"metrics averaged per query over {spec.vocabularies} k-means vocabularies"
        if spec.vocabularies > 1
        else "one k-means vocabulary"
    )
    markdown = "\n\n".join(
        [f"BoVW, {words} visual words ({averaged}), {name} at {spec.size} px. " + TABLE1_NOTE, table1_markdown(bovw)]
    )
    write_table(bovw, paths.tables / "bovw", markdown=markdown)

    vlad = bovw_study(
        spec.source, spec.size, spec.ns, spec.seeds, out_dir=None, n_words=vlad_words, encoding="vlad", **common
    )
    both = pd.concat([bovw, vlad], ignore_index=True)
    vlad_markdown = "\n\n".join(
        [
            f"BoVW ({words} words) and VLAD ({vlad_words} words x 128, power-normalised), "
            f"{name} at {spec.size} px. " + TABLE1_NOTE,
            table1_markdown(both),
        ]
    )
    write_table(vlad, paths.tables / "vlad", markdown=vlad_markdown)
    verdicts = [
        f"N={row.n}, seed {row.seed}: VLAD mAP@10 {row.value:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}] vs "
        f"BoVW {row.baseline_value:.3f} [{row.baseline_ci_low:.3f}, {row.baseline_ci_high:.3f}] -> {row.verdict}"
        for row in baseline_verdicts(both, "mAP@10").itertuples()
    ]

    figure = metric_vs_n(both, ("P@10", "R@100"), title=f"BoVW ({words} words) and VLAD ({vlad_words} words)")
    save_figure(figure, paths.figures / "bovw_vs_n.png")
    precision = []
    for row in bovw[bovw["metric"] == "P@10"].itertuples():
        lift = row.value / row.chance if row.chance else float("nan")
        precision.append(
            f"N={row.n}, seed {row.seed}: P@10 = {row.value:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}], "
            f"{lift:.1f}x chance ({row.chance:.3f}); {row.search_ms_per_query:.1f} ms per query"
        )
    return BoVWResult(bovw, vlad, figure, verdicts, precision)


def console_summary(spec: BoVWSpec, result: tuple[list[pd.DataFrame], pd.DataFrame | None]) -> str:
    """Each table's headline metrics, then the VLAD comparison's size."""
    frames, compared = result
    lines = []
    for results in frames:
        shown = results[results["metric"].isin(["mAP@10", "P@10", "R@100"])]
        lines += [
            f"{results['model'].iloc[0]} {results['variant'].iloc[0]}:",
            shown[["n", "seed", "metric", "value", "ci_low", "ci_high", "chance"]].to_string(index=False),
        ]
    if compared is not None:
        lines.append(f"VLAD beside plain BoVW ({compared['variant'].nunique()} variants): vlad_*.md")
    return "\n".join(lines)


def bovw_study(
    source: str = "imagenette",
    size: int = 160,
    ns: Iterable[int] = (512, 1024, 2048),
    seeds: Iterable[int] = (0,),
    out_dir: str | Path | None = None,
    *,
    n_words: int = 200,
    encoding: str = "histogram",
    rootsift: bool = False,
    tfidf: bool = False,
    power_normalisation: bool | None = None,
    intra_normalisation: bool = False,
    vocabularies: int = 1,
    root: str | Path | None = None,
    annotations: str | Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Evaluate BoVW for every N and seed; write manifests and result tables under ``out_dir`` (see :func:`run`).

    ``vocabularies`` averages the metrics over that many k-means vocabularies (see
    :func:`evaluate_bovw`). The options are :class:`~vitdsi_utils.bovw.BoVW`'s (``encoding="vlad"`` for VLAD); the
    tables are named ``bovw_<source>_<size>px_<variant>`` after :func:`bovw_variant`. ``root``
    and ``annotations`` locate the images as in :func:`data.load_images`. Returns the long
    table: one row per (n, seed, metric) with value, interval, chance and, where the paper
    reported one, its number.
    """
    options = dict(
        encoding=encoding,
        rootsift=rootsift,
        tfidf=tfidf,
        power_normalisation=power_normalisation,
        intra_normalisation=intra_normalisation,
    )
    BoVW(n_words, **options)._check_params()  # a bad combination fails before the images are loaded
    image_set = load_images(source, size, root=root, annotations=annotations, progress=progress)
    out_dir = Path(out_dir) if out_dir is not None else None
    frames = []
    for n in ns:
        for seed in seeds:
            db = build_database(image_set, n, seed=seed)
            if out_dir is not None:
                db.save_manifest(out_dir / "manifests" / f"{database_name(db)}.csv")
            result = evaluate_bovw(
                db, n_words=n_words, **options, seed=seed, vocabularies=vocabularies, progress=progress
            )
            frame = result.table.assign(
                model=VLAD_MODEL if encoding == "vlad" else BOVW_MODEL,
                source=source,
                size=size,
                n=n,
                ids="-",
                seed=seed,
                dim=result.model.dim_,
                **result.timings,
            )
            frames.append(frame)
    results = attach_paper(pd.concat(frames, ignore_index=True))
    variant = bovw_variant(n_words, **options)
    power = (encoding == "vlad") if power_normalisation is None else bool(power_normalisation)
    results = results.assign(
        n_words=n_words,
        rootsift=rootsift,
        tfidf=tfidf,
        encoding=encoding,
        power_normalisation=power,
        intra_normalisation=intra_normalisation,
        variant=variant,
    )
    if out_dir is not None:
        stem = out_dir / f"bovw_{source}_{size}px_{variant}"
        write_table(results, stem, markdown=bovw_markdown(results, source, size))
    return results


def bovw_markdown(results: pd.DataFrame, source: str, size: int) -> str:
    """A Markdown report of a BoVW study: settings, then Table 1's BoVW rows."""
    first = results.iloc[0]
    vlad = first.get("encoding", "histogram") == "vlad"
    flags = (
        ("VLAD", vlad),
        ("RootSIFT", first["rootsift"]),
        ("tf-idf", first["tfidf"]),
        ("intra-normalisation", first.get("intra_normalisation", False)),
        ("no power normalisation" if vlad else "power normalisation", first.get("power_normalisation", vlad) != vlad),
    )
    options = ", ".join(name for name, on in flags if on)
    timing = results.groupby(["n", "seed"])[["fit_s", "search_s"]].first().sum(axis=1)
    encoded = (
        f"one VLAD vector per image ({first['n_words']} x 128 values: the per-word sums of residuals to "
        "the word's centre, signed square root unless said otherwise, L2-normalised)"
        if vlad
        else "one histogram per image"
    )
    return "\n".join(
        [
            f"# BoVW baseline on {source} at {size} px (K = {first['n_words']}{', ' + options if options else ''})",
            "",
            f"Grayscale SIFT, k-means vocabulary of {first['n_words']} words fitted on the indexed images, {encoded}, "
            "cosine similarity, top-100. " + _vocabulary_note(results) + TABLE1_NOTE,
            "",
            table1_markdown(results),
            "",
            f"Fit + search wall time per run: {timing.min():.1f}-{timing.max():.1f} s "
            "(see reports/benchmarks/ for timings on an idle machine).",
        ]
    )


def _vocabulary_note(results: pd.DataFrame) -> str:
    """A sentence on the number of vocabularies the metrics average over ('' for one)."""
    counts = results["vocabularies"] if "vocabularies" in results.columns else pd.Series([1])
    v = int(counts.max())
    if v <= 1:
        return ""
    return (
        f"Every metric is averaged per query over {v} vocabularies (k-means seeds seed ... seed + {v - 1}) "
        "before the bootstrap, so the row is the baseline's expected quality rather than one fit's. "
    )


def _read_bovw_table(path: Path) -> pd.DataFrame:
    """A table written by :func:`bovw_study`, with the columns that tables from before VLAD lack filled in."""
    frame = pd.read_csv(path)
    defaults = {
        "encoding": "histogram",
        "power_normalisation": False,
        "intra_normalisation": False,
        "vocabularies": 1,
        "variant": path.stem.split("px_", 1)[-1],
        "dim": frame["n_words"].iloc[0],
    }
    for column, value in defaults.items():
        if column not in frame.columns:
            frame[column] = value
    return frame


def _is_plain_bovw(frame: pd.DataFrame) -> bool:
    """Whether a BoVW table is the paper's setting: histograms, no RootSIFT, tf-idf or power normalisation."""
    first = frame.iloc[0]
    return first["encoding"] == "histogram" and not (
        first["rootsift"] or first["tfidf"] or first["power_normalisation"]
    )


def vlad_comparison(out_dir: str | Path, source: str, size: int, *, baseline_words: int = 200) -> pd.DataFrame | None:
    """Write ``vlad_<source>_<size>px.{csv,md}``: every VLAD table in ``out_dir`` beside plain BoVW.

    Collects the tables :func:`bovw_study` wrote in ``out_dir`` for ``source`` and ``size``: the
    VLAD variants and plain BoVW (histograms without options). A VLAD variant is *better* or
    *worse* than plain BoVW with ``baseline_words`` words (at the same N and seed) on a metric
    only when their 95% intervals do not overlap. The databases are the same because they are
    drawn from (source, size, N, seed) alone; the query counts are checked anyway. Returns the
    long table, or None when ``out_dir`` holds no VLAD table for this source and size.
    """
    out_dir = Path(out_dir)
    frames = [_read_bovw_table(path) for path in sorted(out_dir.glob(f"bovw_{source}_{size}px_K*.csv"))]
    vlad = [f for f in frames if f["encoding"].iloc[0] == "vlad"]
    plain = [f for f in frames if _is_plain_bovw(f)]
    if not vlad:
        return None
    baseline = next((f for f in plain if f["n_words"].iloc[0] == baseline_words), None)
    if baseline is None:
        raise FileNotFoundError(
            f"no plain BoVW table with {baseline_words} words for {source} at {size} px in {out_dir}; run "
            f"BoVW there first (e.g. `vitdsi run recipes/vlad.yaml`, whose first run is plain BoVW)"
        )
    results = pd.concat(plain + vlad, ignore_index=True)
    queries = results[results["metric"] == "P@10"].groupby(["n", "seed"])["n_queries"].nunique()
    if (queries > 1).any():
        raise ValueError(
            f"the BoVW tables in {out_dir} disagree on the number of test queries at "
            f"(N, seed) = {list(queries[queries > 1].index)}: they come from different databases"
        )
    base = baseline[["n", "seed", "metric", "value", "ci_low", "ci_high"]].rename(
        columns={c: f"baseline_{c}" for c in ("value", "ci_low", "ci_high")}
    )
    results = results.merge(base, on=["n", "seed", "metric"], how="left")
    results["verdict"] = np.where(
        results["ci_low"] > results["baseline_ci_high"],
        "better",
        np.where(results["ci_high"] < results["baseline_ci_low"], "worse", "overlap"),
    )
    results.loc[results["variant"] == baseline["variant"].iloc[0], "verdict"] = "baseline"
    write_table(
        results,
        out_dir / f"vlad_{source}_{size}px",
        markdown=vlad_markdown(results, source, size, baseline["variant"].iloc[0]),
    )
    return results


def vlad_markdown(results: pd.DataFrame, source: str, size: int, baseline: str) -> str:
    """The VLAD comparison as Markdown: one row per (variant, N, seed), then the verdicts against ``baseline``."""
    lines = [
        f"# VLAD against plain BoVW on {source} at {size} px",
        "",
        "Both encode the grayscale SIFT descriptors of an image with a k-means vocabulary fitted on the indexed "
        "images, and rank the indexed images by cosine similarity (top 100). BoVW counts the descriptors per word "
        "(a K-bin histogram, the paper's baseline). VLAD sums, per word, the residuals `x - c` of the descriptors "
        "to the word's centre (K x 128 values), takes the signed square root of every component (power "
        "normalisation; `nopower`: without it), optionally L2-normalises each word's block (`intra`), and "
        "L2-normalises the vector. `rootsift`: RootSIFT descriptors. Values are over all test queries with "
        "bootstrap 95% intervals; `vs " + baseline + "` says *better* or *worse* only where the two intervals do "
        "not overlap (same database, same queries). Times: fit (SIFT, k-means, encoding the indexed images) plus "
        "search of all test queries, one run on a shared 2-core machine.",
        "",
        f"| variant | model | K | dim | N | seed | mAP@10 | P@10 | R@100 | chance P@10 | chance R@100 "
        f"| fit + search s | vs {baseline}: mAP@10 | P@10 | R@100 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = results[["variant", "n", "seed"]].drop_duplicates()
    order = {
        v: i
        for i, v in enumerate(
            results.drop_duplicates("variant").sort_values(["encoding", "n_words", "variant"])["variant"]
        )
    }
    keys = keys.assign(_o=keys["variant"].map(order)).sort_values(["n", "seed", "_o"])
    for variant, n, seed in keys[["variant", "n", "seed"]].itertuples(index=False):
        row = results[(results["variant"] == variant) & (results["n"] == n) & (results["seed"] == seed)]
        row = row.set_index("metric")

        def cell(metric: str, row: pd.DataFrame = row) -> str:
            return metric_cell(row.loc[metric])

        first = row.iloc[0]
        seconds = first["fit_s"] + first["search_s"]
        verdicts = " | ".join(
            row.at[m, "verdict"] if first["verdict"] != "baseline" else "–" for m in ("mAP@10", "P@10", "R@100")
        )
        lines.append(
            f"| {variant} | {first['model']} | {first['n_words']} | {int(first['dim'])} | {n} | {seed} "
            f"| {cell('mAP@10')} | {cell('P@10')} | {cell('R@100')} | {format_number(row.at['P@10', 'chance'])} "
            f"| {format_number(row.at['R@100', 'chance'])} | {seconds:.1f} | {verdicts} |"
        )
    return with_uninformative_note("\n".join(lines))
