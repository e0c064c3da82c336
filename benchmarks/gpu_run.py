"""Check and time the GPU code paths in one go: training precision and compile, decode latency, one paper cell.

    .venv/bin/python benchmarks/gpu_run.py                            # on a GPU machine: under 10 min on one H200
    .venv/bin/python benchmarks/gpu_run.py --dry-run --out /tmp/gpu   # every step on the CPU, tiny sizes, < 1 min

Three steps, each written to ``--out`` (default ``reports/gpu/``) as soon as it ends, so a run cut
short still leaves what it measured: ``README.md`` (tables) and ``gpu_run.json`` (raw numbers, the
settings, the environment: torch version, CUDA, GPU name).

* ``train``: training throughput of the paper's model (160 px, patch 16, dim 128, MLP 256, 6 + 6
  blocks, 4 heads; batch 32, Adam with fused kernels on CUDA) in float32, bf16 autocast, and bf16
  with ``torch.compile``: the training step of ``training.loop.fit`` on random images and IDs, the
  same seeded batches for every variant; examples/s over ``--steps`` steps timed after
  ``--warmup`` steps, between two ``torch.cuda.synchronize``. The first step's time (which holds
  the compilation) is given apart. Checks: every loss finite, and the first step's loss (same
  weights, same batch) of bf16 and of compiled bf16 within :data:`LOSS_TOLERANCE` of float32's.
* ``decode``: top-10 and top-100 beam-search latency per query against N (512, 2,048 and 13,394
  IDs; untrained paper-sized models, whose constrained search does the work of trained ones), in
  float32 and bf16: :func:`vitdsi_utils.retrieval.latency.dsi_latency_rows`, the scale study's
  timing (median of ``--repeats`` calls after a warm-up call, one batch of ``--queries`` queries).
* ``cell``: one cell of the paper's grid end to end (N = 512, clustered IDs, seed 0) with the
  ``paper`` profile's settings (lr 5e-4, batch 32, indexing until IA@1 0.98 or 1000 epochs, then
  75 retrieval epochs, bf16 autocast on CUDA): :func:`vitdsi_utils.studies.dsi.run_experiment`,
  trained from nothing in a temporary run folder. The whole run has ``--budget`` seconds (540):
  indexing raises its cap chunk by chunk (50, 100, 200 ... 1000 epochs, each resuming the last)
  while the time allows, within half of what is left, and the retrieval epochs are cut to what
  the rest allows at the pace indexing measured; ``--cell-index-epochs`` and
  ``--cell-retrieval-epochs`` lower the caps by hand. The report names every cap that ran below
  the profile's, and why.
  The images are Imagenette from ``VITDSI_IMAGENETTE_DIR`` (or an earlier download); without them
  the cell runs on the digits (upsampled to 160 px) and says so: nothing is downloaded.

``--dry-run`` executes every step on the CPU with tiny sizes (a one-block model at 32 px, a few
steps, N = 64 and 256, the ``smoke`` profile's cell for 1 epoch per phase), bf16 autocast on the
CPU and the ``aot_eager`` compile backend (inductor takes minutes to compile on a small CPU), and
writes to ``--out`` (default ``reports/gpu-dry-run/``), never to ``reports/gpu/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

try:
    import vitdsi_utils  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vitdsi_utils import settings
from vitdsi_utils.atomic import write_json
from vitdsi_utils.data.database import database_with_ids
from vitdsi_utils.data.images import imagenette_root, load_images
from vitdsi_utils.devices import autocast, compile_backend, compile_model, resolve_device
from vitdsi_utils.environment import describe_machine, machine_info
from vitdsi_utils.ids.codec import make_codec
from vitdsi_utils.model.vit import DSIConfig, DSIModel
from vitdsi_utils.phases import index_database
from vitdsi_utils.reports.tables import FINE_TUNED, ZERO_SHOT
from vitdsi_utils.retrieval.latency import dsi_latency_rows
from vitdsi_utils.runner.profiles import load_profile
from vitdsi_utils.studies.dsi import DSISpec, run_experiment
from vitdsi_utils.studies.specs import spec_from_profile
from vitdsi_utils.training.config import TrainConfig
from vitdsi_utils.training.loop import make_optimizer, sequence_loss
from vitdsi_utils.training.tasks import RetrievalPairs

STEPS = ("train", "decode", "cell")
#: The paper's model (DSIConfig's defaults, written out so the report does not depend on them).
PAPER_MODEL = {"patch_size": 16, "dim": 128, "mlp_dim": 256, "depth": 6, "heads": 4, "dropout": 0.1}
#: The tiny model of a dry run.
TINY_MODEL = {"patch_size": 8, "dim": 32, "mlp_dim": 64, "depth": 1, "heads": 2, "dropout": 0.1}
#: The first-step losses of bf16 and compiled bf16 must lie this close to float32's (same weights, same batch).
LOSS_TOLERANCE = 0.05
#: The training variants: name -> (TrainConfig.amp, TrainConfig.compile). "bf16" autocasts on any device,
#: so a dry run on the CPU exercises the same path; on CUDA it is what amp=True does.
VARIANTS = {"fp32": (False, False), "bf16": ("bf16", False), "bf16+compile": ("bf16", True)}
#: The cell's time budget: the seconds kept for evaluating both models and writing the report, the share of
#: the rest that indexing may take, the first indexing cap (doubled while time allows), and the factor on a
#: retrieval epoch's training steps for its validation pass and bookkeeping.
EVALUATION_RESERVE = 45.0
INDEX_SHARE = 0.5
FIRST_INDEX_CHUNK = 50
RETRIEVAL_OVERHEAD = 1.3


# ------------------------------------------------------------------------------------------
# Settings of a full run and of a dry run
# ------------------------------------------------------------------------------------------
def plan(args: argparse.Namespace) -> dict[str, Any]:
    """Every size the run uses, from the command line: the full GPU run, or the tiny dry run."""
    if args.dry_run:
        return {
            "image_size": 32,
            "model": TINY_MODEL,
            "train_batch": 8,
            "train_ids": 64,
            "warmup": 2,
            "steps": args.steps or 4,
            "compile_backend": args.compile_backend or "aot_eager",
            "decode_ns": args.decode_n or [64, 256],
            "decode_ks": [10, 100],
            "queries": args.queries or 8,
            "repeats": args.repeats or 1,
            "cell_profile": "smoke",
            "cell_n": 200,
            "cell_index_epochs": args.cell_index_epochs or 1,
            "cell_retrieval_epochs": args.cell_retrieval_epochs or 1,
            "budget": args.budget,
        }
    return {
        "image_size": 160,
        "model": PAPER_MODEL,
        "train_batch": 32,
        "train_ids": 512,
        "warmup": 10,
        "steps": args.steps or 100,
        "compile_backend": args.compile_backend or "inductor",
        "decode_ns": args.decode_n or [512, 2048, 13394],
        "decode_ks": [10, 100],
        "queries": args.queries or 256,
        "repeats": args.repeats or 3,
        "cell_profile": "paper",
        "cell_n": 512,
        "cell_index_epochs": args.cell_index_epochs,  # None: the profile's cap
        "cell_retrieval_epochs": args.cell_retrieval_epochs,
        "budget": args.budget,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------
# Step 1: training throughput
# ------------------------------------------------------------------------------------------
def train_variant(
    name: str, amp: bool | str, compiled: bool | str, sizes: dict[str, Any], device: torch.device, seed: int = 0
) -> dict[str, Any]:
    """Examples/s of the training step of ``fit`` with these ``amp`` and ``compile`` settings; its losses."""
    codec = make_codec(sizes["train_ids"])
    batch, warmup, steps = sizes["train_batch"], sizes["warmup"], sizes["steps"]
    config = TrainConfig(
        batch_size=batch,
        lr=5e-4,
        amp=amp,
        compile=sizes["compile_backend"] if compiled else False,
        device=str(device),
        progress=False,
    )
    g = torch.Generator().manual_seed(seed)
    size = sizes["image_size"]
    images = torch.randint(0, 256, (len(codec), size, size, 3), generator=g, dtype=torch.uint8).to(device)
    targets = codec.targets().to(device)  # (n, L): image i's ID is row i
    inputs = codec.decoder_inputs(targets)
    order = torch.randint(0, len(codec), (warmup + steps, batch), generator=g).to(device)
    torch.manual_seed(seed)  # the same initial weights and dropout for every variant
    model = DSIModel(DSIConfig.from_codec(codec, image_size=size, **sizes["model"])).to(device).train()
    optimizer = make_optimizer(model, config)
    step_model = compile_model(model, config.compile)

    def step(i: int) -> torch.Tensor:  # the step of training.engine.run_training with loop._DSIObjective's loss
        rows = order[i]
        with autocast(device, config.amp):
            logits = step_model(images[rows], inputs[rows])
        loss = sequence_loss(logits, targets[rows], codec.pad)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    t0 = time.perf_counter()
    losses = [step(0)]
    synchronize(device)
    first = time.perf_counter() - t0
    losses += [step(i) for i in range(1, warmup)]
    synchronize(device)
    t0 = time.perf_counter()
    losses += [step(i) for i in range(warmup, warmup + steps)]
    synchronize(device)
    seconds = time.perf_counter() - t0
    values = [float(v) for v in torch.stack(losses).float().cpu()]
    return {
        "variant": name,
        "amp": amp,
        "compile": config.compile,
        "batch": batch,
        "timed_steps": steps,
        "examples_per_s": steps * batch / seconds,
        "ms_per_step": 1000 * seconds / steps,
        "first_step_s": first,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "first_loss": values[0],
        "last_loss": values[-1],
        "losses_finite": all(math.isfinite(v) for v in values),
        "parameters": model.num_parameters(),
    }


def train_step(sizes: dict[str, Any], device: torch.device) -> dict[str, Any]:
    rows = []
    for name, (amp, compiled) in VARIANTS.items():
        rows.append(train_variant(name, amp, compiled, sizes, device))
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    fp32 = rows[0]
    for row in rows:
        row["speedup_vs_fp32"] = row["examples_per_s"] / fp32["examples_per_s"]
        row["first_loss_diff_vs_fp32"] = abs(row["first_loss"] - fp32["first_loss"])
    checks = {
        "losses_finite": all(r["losses_finite"] for r in rows),
        "bf16_first_loss_close": all(r["first_loss_diff_vs_fp32"] <= LOSS_TOLERANCE for r in rows),
    }
    return {"rows": rows, "checks": checks}


# ------------------------------------------------------------------------------------------
# Step 2: decode latency against N
# ------------------------------------------------------------------------------------------
def decode_step(sizes: dict[str, Any], device: torch.device) -> dict[str, Any]:
    size = sizes["image_size"]
    rng = np.random.default_rng(1)
    queries = rng.integers(0, 256, (sizes["queries"], size, size, 3), dtype=np.uint8)
    rows = []
    for amp, precision in ((False, "fp32"), ("bf16", "bf16")):
        for n in sizes["decode_ns"]:
            found = dsi_latency_rows(
                n,
                queries,
                sizes["decode_ks"],
                model_overrides=sizes["model"],
                batch_size=sizes["queries"],
                repeats=sizes["repeats"],
                device=device,
                amp=amp,
            )
            for row in found:
                rows.append({"precision": precision, "n": n, "queries": sizes["queries"], **row})
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    return {"rows": rows}


# ------------------------------------------------------------------------------------------
# Step 3: one cell of the paper's grid
# ------------------------------------------------------------------------------------------
def cell_images(profile: dict[str, Any]) -> tuple[Any, str]:
    """The profile's image set, or the digits at its size when Imagenette is not on this machine (and a note why).

    Nothing is downloaded: a GPU machine often has no network, and a download would eat the time budget.
    """
    source, size = profile["DATASET"], profile["SIZE"]
    note = ""
    if source == "imagenette":
        try:
            imagenette_root(download=False)
        except FileNotFoundError:
            note = (
                f"Imagenette is not on this machine ({settings.IMAGENETTE_ENV} unset or not a folder, no earlier "
                "download): the cell ran on the digits instead, so its metrics are not comparable with the paper's"
            )
            source = "digits"
    return load_images(source, size, progress=False), note


def index_within(
    db: Any, codec: Any, overrides: dict, config: TrainConfig, run_dir: str, seconds: float
) -> tuple[Any, bool]:
    """Index ``db`` up to ``config.epochs`` epochs or the target, in chunks of doubling caps, within ``seconds``.

    Each chunk raises the cap of the run in ``run_dir`` and :func:`phases.index_database` continues it
    from its checkpoint (exactly where it stopped, as any resumed run), so the model is the one a single
    run to the final cap trains. A next chunk starts only when the time the last ones took per epoch
    says it ends within ``seconds``. Returns (the indexed phase, whether time cut the cap short).
    """
    t0, wanted = time.perf_counter(), config.epochs
    cap = min(wanted, FIRST_INDEX_CHUNK)
    while True:
        zero = index_database(
            db, model_overrides=overrides, config=dataclasses.replace(config, epochs=cap), run_dir=run_dir, codec=codec
        )
        if zero.reached_target or cap >= wanted:
            return zero, False
        per_epoch = (time.perf_counter() - t0) / cap
        following = min(wanted, 2 * cap)
        if time.perf_counter() - t0 + (following - cap) * per_epoch > seconds:
            return zero, True
        cap = following


def retrieval_cap(db: Any, zero: Any, config: TrainConfig, wanted: int, seconds: float) -> int:
    """The most retrieval epochs (at most ``wanted``) that fit in ``seconds``, by the indexing phase's pace.

    A retrieval epoch is ceil(pairs / batch) steps of the same model, batch and precision as an indexing
    step; the indexing epochs' own training time (their history's ``seconds``) gives the time per step,
    and :data:`RETRIEVAL_OVERHEAD` covers the validation pass and the per-epoch bookkeeping.
    """
    rows = [r for r in zero.history if r["split"] == "train"]
    steps_per_index_epoch = math.ceil(db.n_index / config.batch_size)
    per_step = sum(r["seconds"] for r in rows) / max(1, len(rows) * steps_per_index_epoch)
    train_images, _ = db.split("train")
    pairs = RetrievalPairs.from_labels(
        torch.from_numpy(train_images), db.relevance_labels("train"), db.relevance_labels("index")
    )
    per_epoch = RETRIEVAL_OVERHEAD * math.ceil(len(pairs) / config.batch_size) * per_step
    return max(1, min(wanted, int(seconds // per_epoch) if per_epoch > 0 else wanted))


def cell_step(sizes: dict[str, Any], device: torch.device, deadline: float) -> dict[str, Any]:
    """The paper's cell (profile ``sizes["cell_profile"]``), trained from nothing; caps fitted to ``deadline``."""
    profile = load_profile(sizes["cell_profile"])
    spec = spec_from_profile(DSISpec, profile, ignore_unknown=True)
    caps = {"index": sizes["cell_index_epochs"], "fine_tune": sizes["cell_retrieval_epochs"]}
    configs = {}
    for phase, config in (("index", spec.index), ("fine_tune", spec.fine_tune)):
        changes = {"device": str(device), "progress": False, "seed": 0}
        if caps[phase] is not None:
            changes["epochs"] = min(config.epochs, caps[phase])
        configs[phase] = dataclasses.replace(config, **changes)
    t0 = time.perf_counter()
    image_set, note = cell_images(profile)
    load_s = time.perf_counter() - t0
    db, assignment = database_with_ids(image_set, sizes["cell_n"], "clustered", seed=0)
    overrides = spec.model.overrides()
    with tempfile.TemporaryDirectory(prefix="gpu-run-cell-") as run_dir:  # trained from nothing, every time
        t0 = time.perf_counter()
        left = deadline - t0 - EVALUATION_RESERVE
        zero, index_cut = index_within(db, assignment.codec, overrides, configs["index"], run_dir, INDEX_SHARE * left)
        if not zero.reached_target:  # the cap it ran to (a run that reached its target is reused under any cap)
            configs["index"] = dataclasses.replace(configs["index"], epochs=zero.epoch_cap)
        left = deadline - time.perf_counter() - EVALUATION_RESERVE
        wanted = configs["fine_tune"].epochs
        epochs = retrieval_cap(db, zero, configs["fine_tune"], wanted, left)
        configs["fine_tune"] = dataclasses.replace(configs["fine_tune"], epochs=epochs)
        # the indexed model is read back from the run folder; then fine-tuning and the evaluation of both
        experiment = run_experiment(
            db,
            model_overrides=overrides,
            index_config=configs["index"],
            retrieval_config=configs["fine_tune"],
            run_dir=run_dir,
            codec=assignment.codec,
            ids="clustered",
        )
        total_s = time.perf_counter() - t0
    table = experiment.table
    metrics = ["IA@1", "mAP@10", "P@10", "R@100"]
    shown = table[table["metric"].isin(metrics)]
    results = {
        model: {m: float(v) for m, v in zip(part["metric"], part["value"])} for model, part in shown.groupby("model")
    }
    paper = {}
    if "paper" in shown and not note:  # the paper's numbers are Imagenette's, not the digits'
        paper = {
            model: {m: (None if pd.isna(v) else float(v)) for m, v in zip(part["metric"], part["paper"])}
            for model, part in shown.groupby("model")
        }
    phases = {}
    for name, result in ((ZERO_SHOT, experiment.zero_shot), (FINE_TUNED, experiment.fine_tuned)):
        phases[name] = {
            "epochs": result.epochs,
            "epoch_cap": configs["index" if name == ZERO_SHOT else "fine_tune"].epochs,
            "reached_target": result.reached_target,
            "train_s": result.seconds,
            "s_per_epoch": result.seconds / max(result.epochs, 1),
        }
    profile_caps = {"index": spec.index.epochs, "fine_tune": spec.fine_tune.epochs}
    return {
        "profile": sizes["cell_profile"],
        "source": image_set.source,
        "image_set": image_set.name,
        "size": image_set.size,
        "n": int(db.settings["n"]),
        "n_index": db.n_index,
        "ids": "clustered",
        "seed": 0,
        "note": note,
        "model": overrides,
        "index_config": configs["index"].to_dict(),
        "retrieval_config": configs["fine_tune"].to_dict(),
        "capped": {k: configs[k].epochs < profile_caps[k] for k in profile_caps},
        "time_capped": {"index": index_cut, "fine_tune": epochs < wanted},
        "profile_epochs": profile_caps,
        "load_images_s": load_s,
        "train_and_evaluate_s": total_s,
        "phases": phases,
        "metrics": results,
        "paper": paper,
    }


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    info = {k: str(v) for k, v in machine_info().items()}
    info["torch_device"] = str(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gib=f"{props.total_memory / 2**30:.1f}",
            gpu_capability=f"{props.major}.{props.minor}",
            cudnn=str(torch.backends.cudnn.version()),
        )
    return info


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    frame = pd.DataFrame(rows)
    return frame[[c for c in columns if c in frame]].round(3).to_markdown(index=False)


def markdown(results: dict[str, Any]) -> str:
    env, sizes = results["environment"], results["settings"]
    where = env.get("gpu", "CPU")
    lines = [
        f"# GPU run ({'dry run on the CPU, tiny sizes: the numbers mean nothing' if results['dry_run'] else where})",
        "",
        f"Machine: {results['machine']}"
        + (f"; CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}" if "gpu" in env else "")
        + f". Written by `benchmarks/gpu_run.py{' --dry-run' if results['dry_run'] else ''}`; raw numbers in "
        "`gpu_run.json`. Seconds per step: " + ", ".join(f"{k} {v:.1f}" for k, v in results["seconds"].items()) + ".",
    ]
    if "train" in results:
        train = results["train"]
        lines += [
            "",
            "## Training throughput",
            "",
            f"Model: {sizes['model']} at {sizes['image_size']} px, {train['rows'][0]['parameters']:,} parameters; "
            f"batch {sizes['train_batch']}, Adam (fused on CUDA), gradient clipping 1.0, random images and IDs "
            f"(N = {sizes['train_ids']}), the same seeded batches for every variant. `examples_per_s`: "
            f"{sizes['steps']} steps timed after {sizes['warmup']} warm-up steps, between two "
            "`torch.cuda.synchronize`; `first_step_s`: the first step alone (it compiles). "
            f"Compile backend: `{sizes['compile_backend']}`. Checks: every loss finite "
            f"({train['checks']['losses_finite']}); first-step loss of every variant within {LOSS_TOLERANCE} "
            f"of float32's ({train['checks']['bf16_first_loss_close']}).",
            "",
            table(
                train["rows"],
                [
                    "variant",
                    "examples_per_s",
                    "speedup_vs_fp32",
                    "ms_per_step",
                    "first_step_s",
                    "peak_memory_gib",
                    "first_loss",
                    "first_loss_diff_vs_fp32",
                    "last_loss",
                ],
            ),
        ]
    if "decode" in results:
        lines += [
            "",
            "## Beam-search latency against N",
            "",
            f"Untrained models of the same size, N decimal IDs, {sizes['queries']} random queries decoded in one "
            f"batch, top-k with beam k; median of {sizes['repeats']} calls after a warm-up call "
            "(`retrieval.latency.dsi_latency_rows`, the scale study's timing). `build_s`: codec and trie.",
            "",
            table(results["decode"]["rows"], ["precision", "n", "k", "ms_per_query", "cpu_ms_per_query", "build_s"]),
        ]
    if "cell" in results:
        cell = results["cell"]
        caps = []
        for key, config, label in (
            ("index", "index_config", "indexing"),
            ("fine_tune", "retrieval_config", "retrieval"),
        ):
            ran, wanted = cell[config]["epochs"], cell["profile_epochs"][key]
            if ran < wanted:
                why = f"to fit the time budget of {sizes['budget']:.0f} s" if cell["time_capped"][key] else "by request"
                caps.append(f"{label} capped at {ran} epoch{'s' if ran != 1 else ''} (profile: {wanted}) {why}")
        cap_text = ("Epoch caps: " + "; ".join(caps) + ".") if caps else "Not capped: the profile's epoch caps."
        rows = [
            {
                "model": m,
                **cell["phases"].get(m, {}),
                **values,
                **{f"paper {k}": v for k, v in cell["paper"].get(m, {}).items()},
            }
            for m, values in cell["metrics"].items()
        ]
        lines += [
            "",
            "## One cell of the paper's grid",
            "",
            f"Profile `{cell['profile']}`: {cell['image_set']} at {cell['size']} px, N = {cell['n']} "
            f"({cell['n_index']} indexed), clustered IDs, seed 0; model {cell['model']}; indexing lr "
            f"{cell['index_config']['lr']}, batch {cell['index_config']['batch_size']}, until IA@1 "
            f"{cell['index_config']['target_accuracy']} or {cell['index_config']['epochs']} epochs; retrieval "
            f"{cell['retrieval_config']['epochs']} epochs; amp {cell['index_config']['amp']}. {cap_text} "
            + (f"{cell['note']}. " if cell["note"] else "")
            + f"Images loaded in {cell['load_images_s']:.1f} s; training and evaluation took "
            f"{cell['train_and_evaluate_s']:.1f} s.",
            "",
            table(
                rows,
                [
                    "model",
                    "epochs",
                    "epoch_cap",
                    "reached_target",
                    "train_s",
                    "s_per_epoch",
                    "IA@1",
                    "mAP@10",
                    "P@10",
                    "R@100",
                    "paper IA@1",
                    "paper mAP@10",
                    "paper P@10",
                    "paper R@100",
                ],
            ),
        ]
    lines += [
        "",
        "## Environment",
        "",
        pd.DataFrame(sorted(env.items()), columns=["", "value"]).to_markdown(index=False),
    ]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gpu_run.json", results)
    (out / "README.md").write_text(markdown(results))


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny sizes (< 1 min)")
    parser.add_argument("--out", default=None, help="folder (default reports/gpu/, dry run reports/gpu-dry-run/)")
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:1 (a dry run always uses the CPU)")
    parser.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS), help="run only these steps")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per variant (100)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; dry run aot_eager)")
    parser.add_argument("--decode-n", type=int, nargs="+", default=None, help="N of the latency table")
    parser.add_argument("--queries", type=int, default=None, help="queries per timed decoding batch (256)")
    parser.add_argument("--repeats", type=int, default=None, help="timed decoding calls, median reported (3)")
    parser.add_argument("--cell-index-epochs", type=int, default=None, help="cap of the cell's indexing epochs")
    parser.add_argument("--cell-retrieval-epochs", type=int, default=None, help="cap of its retrieval epochs")
    parser.add_argument(
        "--budget", type=float, default=540.0, help="seconds for the whole run: the cell's epoch caps are fitted to it"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; dry run 1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse(argv)
    threads = args.threads or (1 if args.dry_run else None)  # tiny models gain nothing from a second thread
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cpu") if args.dry_run else resolve_device(args.device)
    if device.type != "cuda" and not args.dry_run:
        print("gpu_run.py times a GPU and torch sees none here; run it with --dry-run to check it on the CPU")
        return 2
    backend = compile_backend(args.compile_backend or True)
    if backend not in torch.compiler.list_backends(exclude_tags=()):  # fail now, not after the other steps
        print(
            f"unknown torch.compile backend {backend!r}; choose one of {torch.compiler.list_backends(exclude_tags=())}"
        )
        return 2
    sizes = plan(args)
    out = Path(args.out) if args.out else settings.reports_dir() / ("gpu-dry-run" if args.dry_run else "gpu")
    results: dict[str, Any] = {
        "dry_run": args.dry_run,
        "machine": describe_machine(),
        "environment": environment(device),
        "settings": sizes,
        "seconds": {},
    }
    print(f"machine: {results['machine']}; device {device}; writing {out}", flush=True)
    for name in (s for s in STEPS if s in args.only):
        t0 = time.perf_counter()
        if name == "train":
            results["train"] = train_step(sizes, device)
        elif name == "decode":
            results["decode"] = decode_step(sizes, device)
        else:
            results["cell"] = cell_step(sizes, device, start + args.budget)
        results["seconds"][name] = time.perf_counter() - t0
        write(results, out)  # after every step: a run cut short keeps what it measured
        print(f"{name}: {results['seconds'][name]:.1f} s (total {time.perf_counter() - start:.1f} s)", flush=True)
    results["seconds"]["total"] = time.perf_counter() - start
    write(results, out)
    print(f"written {out / 'README.md'} and {out / 'gpu_run.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
