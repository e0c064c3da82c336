"""The report of the pretraining study (notebook 13): tables, the indexing summary in words, the figure, the markdown.

:func:`vitdsi_utils.studies.pretrain.pretrain_study` computes the results; this module only
presents them: :func:`comparison_frame` (one row per model and initialisation),
:func:`indexing_epochs_summary` (how each indexing phase ended), :func:`pretrain_figure` (the
pretraining loss beside the indexing curves), :func:`pretrain_markdown` and
:func:`write_pretrain_report` (every table, CSV and the figure into a recipe's folder), or
:func:`write_profile_report` (notebook 13's files in a profile's report, and its verdict lines).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
from matplotlib.figure import Figure

from vitdsi_utils.baselines.ssl import SSLConfig
from vitdsi_utils.model.vit import ViTConfig
from vitdsi_utils.reports.plots import new_figure, save_figure
from vitdsi_utils.reports.tables import metric_cell, with_uninformative_note, write_csv, write_table

#: The metrics the comparison table shows for every model.
COMPARED = ("IA@1", "IA@5", "mAP@10", "P@10", "R@100")


def comparison_frame(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, init): the compared metrics as 'value [low, high]', epochs and train time."""

    rows = []
    keys = ["model", "init"] + (["ids"] if "ids" in results else [])
    for key, group in results.groupby(keys, sort=False):
        row = dict(zip(keys, key))
        for metric in COMPARED:
            hit = group[group["metric"] == metric]
            row[metric] = metric_cell(hit.iloc[0]) if len(hit) else "–"
        row["epochs"] = int(group["epochs"].iloc[0]) if "epochs" in group else None
        row["train_s"] = round(float(group["train_s"].iloc[0]), 1) if "train_s" in group else None
        rows.append(row)
    return pd.DataFrame(rows).sort_values(keys, ascending=[False] + [True] * (len(keys) - 1), ignore_index=True)


def indexing_epochs_summary(results: pd.DataFrame, target_accuracy: float, epoch_cap: int) -> str:
    """How each DSI's indexing ended, in words: the epochs to reach IA@1 >= target, or that it did not.

    One clause per (init, IDs) of the ``DSI zero-shot`` rows of ``results`` (:func:`pretrain_study`):
    "from scratch: 12 epochs to IA@1 >= 0.99 (IA@1 0.995)" when the target was met, else
    "from scratch: target not reached, IA@1 0.48 after 40 epochs (the cap)". An epoch count at the
    cap is never reported as the epochs needed to reach the target.
    """
    names = {"scratch": "from scratch", "ssl": "from the pretrained encoder"}
    zero = results[results["model"] == "DSI zero-shot"]
    keys = ["init"] + (["ids"] if "ids" in zero else [])
    groups = list(zero.groupby(keys, sort=False))
    several_ids = "ids" in zero and zero["ids"].nunique() > 1
    clauses = []
    for key, group in groups:
        init, ids = (key[0], key[1] if len(key) > 1 else None) if isinstance(key, tuple) else (key, None)
        label = names.get(init, init) + (f" ({ids} IDs)" if several_ids and ids is not None else "")
        ia = group.loc[group["metric"] == "IA@1", "value"]
        epochs = int(group["epochs"].iloc[0]) if "epochs" in group and group["epochs"].notna().any() else None
        if ia.empty or epochs is None:
            clauses.append(f"{label}: no indexing result")
            continue
        value = float(ia.iloc[0])
        if value >= target_accuracy:
            clauses.append(f"{label}: {epochs} epochs to IA@1 >= {target_accuracy:g} (IA@1 {value:.3f})")
        else:
            ended = "the cap" if epochs >= epoch_cap else f"stopped by the stop check before the cap of {epoch_cap}"
            clauses.append(
                f"{label}: target IA@1 >= {target_accuracy:g} not reached, IA@1 {value:.3f} after "
                f"{epochs} epochs ({ended})"
            )
    return "indexing: " + "; ".join(clauses)


def pretrain_figure(ssl_history: pd.DataFrame, histories: pd.DataFrame):
    """Left: the InfoNCE loss per pretraining epoch. Right: indexing IA@1 / accuracy per epoch, scratch vs SSL."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = new_figure(1, 2, (9.0, 3.3))
    left, right = axes[0]
    left.plot(ssl_history["epoch"], ssl_history["loss"], "o-", color="tab:purple")
    left.set_xlabel("pretraining epoch")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_ylabel("InfoNCE loss")
    left.set_title("self-supervised pretraining")
    left.grid(alpha=0.3)
    if len(histories):
        indexing = histories[histories["phase"] == "indexing"]
        if "ids" not in indexing:
            indexing = indexing.assign(ids="")
        styles = {"scratch": ("--", "tab:blue"), "ssl": ("-", "tab:orange")}
        others = iter(["tab:green", "tab:red", "tab:purple", "tab:brown"])  # further ID schemes of one init
        runs = list(dict.fromkeys(zip(indexing["init"], indexing["ids"])))
        several_ids = len({ids for _, ids in runs}) > 1
        for init, ids in runs:
            style, color = styles.get(init, (":", "tab:gray"))
            if ids != runs[0][1]:
                style, color = "-.", next(others, "tab:gray")
            label = f"{init}" + (f", {ids} IDs" if several_ids else "")
            run = indexing[(indexing["init"] == init) & (indexing["ids"] == ids)]
            for split, fmt, what in (
                ("train", style, "running, dropout"),
                ("train_eval", "o", "stop check, no dropout"),
            ):
                part = run[run["split"] == split]
                if len(part):
                    right.plot(part["epoch"], part["seq_acc"], fmt, ms=3, color=color, label=f"{label}: {what}")
    right.set_xlabel("indexing epoch")
    right.set_ylabel("sequence accuracy on the indexed images")
    right.set_ylim(-0.02, 1.02)
    right.set_title("indexing: from scratch vs from the SSL encoder")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def pretrain_markdown(
    out: dict,
    source: str,
    size: int,
    n: int,
    scheme: str,
    seed: int,
    encoder_config: ViTConfig,
    ssl_config: SSLConfig,
    n_images: int,
    ssl_seconds: float,
    index_config: Any,
    retrieval_config: Any,
    max_pairs: int | None,
) -> str:
    """The report of :func:`pretrain_study`: settings, DSI rows by initialisation, paired differences, probes."""
    comparison = comparison_frame(out["results"])
    probes = out["probes"][["encoder", "knn_acc", "linear_acc", "map@10", "chance"]].round(3)
    c, s = encoder_config, ssl_config
    markdown = "\n".join(
        [
            f"# Encoder pretraining on {source} at {size} px (N = {n}, {scheme} IDs, seed {seed})",
            "",
            f"Encoder: ViT patch {c.patch_size}, width {c.dim}, {c.depth} blocks, {c.heads} heads, {c.pos_encoding} "
            f"positions (the DSI's). Pretraining: SimCLR-style InfoNCE (temperature {s.temperature}) on two views per "
            f"image (random resized crop down to {s.min_scale:g} of the area, flip, colour jitter {s.jitter:g} with "
            f"p {s.jitter_p:g}, grayscale with p {s.gray_p:g}), projection head {c.dim}-{s.proj_hidden}-{s.proj_dim}, "
            f"AdamW lr {s.lr:g} (warm-up {s.warmup_steps} steps, cosine decay), batch {s.batch_size}, {s.epochs} epochs "
            f"over {n_images} images that no database of the study uses ({ssl_seconds / 60:.1f} min). "
            f"DSI: indexing lr {index_config.lr:g}, warm-up {index_config.warmup_steps}, until IA@1 >= "
            f"{index_config.target_accuracy} (at most {index_config.epochs} epochs); fine-tuning {retrieval_config.epochs} "
            f"epochs" + (f", at most {max_pairs} pairs per query" if max_pairs else "") + ". Metrics over all test "
            "queries (IA: all indexed images), 95% bootstrap intervals in brackets.",
            "",
            with_uninformative_note(comparison.to_markdown(index=False)),
            "",
            "Indexing "
            + indexing_epochs_summary(out["results"], index_config.target_accuracy, index_config.epochs).removeprefix(
                "indexing "
            )
            + ".",
            *(
                []
                if out["paired"].empty
                else [
                    "",
                    "Paired differences, SSL init minus scratch, on the same indexed images / test queries "
                    "(95% paired bootstrap intervals):",
                    "",
                    out["paired"][["model", "metric", "a", "b", "diff", "ci_low", "ci_high", "n"]]
                    .rename(columns={"a": "ssl", "b": "scratch"})
                    .round(3)
                    .to_markdown(index=False),
                ]
            ),
            *(
                []
                if out["id_facts"].empty
                else [
                    "",
                    "Semantic IDs from the encoder's embeddings (hierarchical k-means over the mean-pooled embeddings of the "
                    "indexed images; the `semantic` rows above are the DSI from the SSL encoder with the SSL ones). "
                    "`sibling_agreement`: the share of pairs of images under the same parent prefix that share a class; "
                    "`sibling_chance`: the same for random groups of those sizes.",
                    "",
                    out["id_facts"][
                        [
                            "embeddings",
                            "tag",
                            "n_ids",
                            "mean_length",
                            "max_length",
                            "sibling_agreement",
                            "sibling_chance",
                        ]
                    ]
                    .round(3)
                    .to_markdown(index=False),
                ]
            ),
            "",
            "Probes of the mean-pooled encoder embeddings on the database (before any DSI training): "
            "kNN (k = 10) class accuracy of the test queries among the indexed images, a logistic-regression "
            "probe trained on the train queries and indexed images, and cosine retrieval mAP@10.",
            "",
            probes.to_markdown(index=False),
        ]
    )
    return markdown


def write_pretrain_report(out: dict, out_dir: Path, source: str, size: int) -> None:

    stem = f"{source}_{size}px"
    write_table(out["results"], out_dir / f"pretrain_{stem}", markdown=out["markdown"])
    write_table(out["probes"], out_dir / f"probes_{stem}")
    if not out["paired"].empty:
        write_table(out["paired"], out_dir / f"paired_{stem}")
    if not out["id_facts"].empty:
        write_table(out["id_facts"], out_dir / f"ids_{stem}")
    write_csv(out["ssl_history"], out_dir / f"ssl_history_{stem}.csv")
    if len(out["histories"]):
        write_csv(out["histories"], out_dir / f"histories_{stem}.csv")
    save_figure(pretrain_figure(out["ssl_history"], out["histories"]), out_dir / f"pretrain_{stem}.png")


class PretrainResult(NamedTuple):
    """What a notebook profile's pretraining study returns: the tables it wrote (by file stem), the
    report's Markdown, the figure (``pretrain``) and the printed lines (indexing summary, paired verdicts)."""

    tables: dict[str, pd.DataFrame]
    markdown: str
    figures: dict[str, Figure]
    lines: list[str]


def paired_verdicts(paired: pd.DataFrame) -> list[str]:
    """One line per row of the paired comparison: the difference, its interval and what the interval says."""
    lines = []
    for row in paired.itertuples():
        verdict = "better" if row.ci_low > 0 else "worse" if row.ci_high < 0 else "no difference the interval can tell"
        lines.append(
            f"{row.model}, {row.metric}: pretrained minus scratch {row.diff:+.3f} "
            f"[{row.ci_low:+.3f}, {row.ci_high:+.3f}] -> {verdict}"
        )
    return lines


def write_profile_report(
    out: dict, tables: Path, figures: Path, target_accuracy: float, epoch_cap: int
) -> PretrainResult:
    """Notebook 13's files: ``tables/pretrain`` (with the report as Markdown), ``pretrain_paired``,
    ``pretrain_semantic_ids`` (when there are semantic IDs), ``pretrain_probes``, the pretraining and
    indexing curves as CSV, and ``figures/pretrain.png``."""
    written = {"pretrain": out["results"], "pretrain_paired": out["paired"]}
    write_table(out["results"], tables / "pretrain", markdown=out["markdown"])
    write_table(out["paired"], tables / "pretrain_paired")
    if len(out["id_facts"]):
        write_table(out["id_facts"], tables / "pretrain_semantic_ids")
        written["pretrain_semantic_ids"] = out["id_facts"]
    write_table(out["probes"], tables / "pretrain_probes")
    write_csv(out["ssl_history"], tables / "pretrain_ssl_history.csv")
    write_csv(out["histories"], tables / "pretrain_histories.csv")
    written.update(
        pretrain_probes=out["probes"], pretrain_ssl_history=out["ssl_history"], pretrain_histories=out["histories"]
    )
    figure = pretrain_figure(out["ssl_history"], out["histories"])
    save_figure(figure, figures / "pretrain.png")
    lines = [indexing_epochs_summary(out["results"], target_accuracy, epoch_cap), *paired_verdicts(out["paired"])]
    return PretrainResult(written, out["markdown"], {"pretrain": figure}, lines)
