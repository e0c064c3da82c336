"""Exactness of the incremental beam search on trained models: the smoke profile's DSIs and a briefly
trained DSI of the cpu profile's model, against the previous implementation and the exhaustive scorer.

    .venv/bin/python benchmarks/check_beam_exactness.py --threads 1      # about 5 minutes on one idle core

* ``smoke``: the smoke profile's database (digits at 32 px, N = 200, 50 indexed) and model (dim 32,
  1 + 1 blocks), trained as the profile trains (at most ``INDEX_EPOCHS``), once per ID scheme of
  ``IDS_SCHEMES``: clustered and random decimal IDs, semantic and RQ IDs of different lengths
  (PAD after EOS), atomic IDs (one token).
* ``cpu``: the cpu profile's model (dim 128, MLP 256, 6 + 6 blocks, 4 heads, patch 16) on the
  Imagenette database of N = 512 at 64 px (128 indexed), trained for ``--cpu-epochs`` epochs
  (trained cpu-profile checkpoints are not in a fresh checkout).

For every model, all its database images (indexed images and queries) are searched by
``beam_search`` and ``beam_search_reference`` (top-k, beam k = min(100, IDs)) and compared with
``bench_beam.compare``; the top-1 of a beam as wide as the index is checked against the argmax of
``score_all_ids``; ``greedy_decode`` against greedy decoding with the full decoder. Models are
trained in a temporary folder and not kept. Writes ``reports/benchmarks/beam_exactness.{md,csv}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import vitdsi_utils  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_beam import TOLERANCE, compare  # noqa: E402

from vitdsi_utils import settings  # noqa: E402
from vitdsi_utils.data.database import database_with_ids  # noqa: E402
from vitdsi_utils.data.images import load_images  # noqa: E402
from vitdsi_utils.environment import describe_machine  # noqa: E402
from vitdsi_utils.model.decoding import (  # noqa: E402
    beam_search,
    beam_search_reference,
    greedy_decode,
    score_all_ids,
)
from vitdsi_utils.phases import index_database  # noqa: E402
from vitdsi_utils.reports.tables import write_table  # noqa: E402
from vitdsi_utils.runner.profiles import load_profile  # noqa: E402
from vitdsi_utils.training.config import TrainConfig  # noqa: E402


def model_overrides(p: dict) -> dict:
    return dict(
        patch_size=p["PATCH_SIZE"],
        dim=p["DIM"],
        mlp_dim=p["MLP_DIM"],
        depth=p["DEPTH"],
        heads=p["HEADS"],
        dropout=p["DROPOUT"],
        pos_encoding=p["POS_ENCODING"],
    )


def id_params(p: dict) -> dict:
    return dict(
        k=p["IDS_K"],
        c=p["IDS_C"],
        levels=p["IDS_RQ_LEVELS"],
        codebook_size=p["IDS_RQ_CODEBOOK"],
        bovw_words=p["BOVW_WORDS"],
    )


def full_decoder_greedy(model, images: torch.Tensor, codec) -> torch.Tensor:
    """Greedy decoding re-running the whole decoder over the prefix (greedy_decode before issue 17)."""
    with torch.inference_mode():
        memory = model.eval().encode(images)
        prefix = torch.full((len(images), 1), codec.bos)
        out = []
        for _ in range(codec.max_length):
            token = model.decode(memory, prefix)[:, -1].argmax(dim=-1)
            out.append(token)
            prefix = torch.cat([prefix, token.masked_fill(token == codec.eos, codec.pad)[:, None]], dim=1)
    return torch.stack(out, dim=1)


def check(profile: str, scheme: str, db, codec, model, seconds: float, epochs: int) -> dict:
    images = torch.from_numpy(db.images)  # every database image: the indexed ones and the queries
    n = len(codec)
    k = min(100, n)
    model.eval()
    new = beam_search(model, images, codec, k=k)
    ref = beam_search_reference(model, images, codec, k=k)
    agreement = compare(ref, new)
    _, own = beam_search(model, torch.from_numpy(db.split("index")[0]), codec, k=1)
    _, wide = beam_search(model, images, codec, k=1, beam_size=n)
    exact = score_all_ids(model, images, codec)
    lengths = [len(c) for c in codec.codes]
    return {
        "profile": profile,
        "ids": scheme,
        "indexed": n,
        "id_tokens": f"{min(lengths)}-{max(lengths)}",
        "train_epochs": epochs,
        "train_s": round(seconds, 1),
        "ia1": float((own[:, 0] == torch.arange(n)).float().mean()),
        "queries": len(images),
        "k": k,
        **agreement,
        "top1_is_argmax": float((wide[:, 0] == exact.argmax(dim=1)).float().mean()),
        "greedy_equal": float(
            (greedy_decode(model, images, codec) == full_decoder_greedy(model, images, codec)).all(dim=1).float().mean()
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cpu-epochs", type=int, default=30, help="training epochs of the cpu-profile model")
    parser.add_argument("--cpu-ids", nargs="+", default=["clustered", "atomic"], help="ID schemes of the cpu model")
    parser.add_argument("--skip-cpu", action="store_true", help="only the smoke profile's models")
    parser.add_argument("--out", default=None, help="folder (default reports/benchmarks/)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else settings.reports_dir() / "benchmarks"
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as runs:
        smoke = load_profile("smoke")
        image_set = load_images(smoke["DATASET"], smoke["SIZE"])
        config = TrainConfig(
            lr=smoke["LR"],
            batch_size=smoke["BATCH_SIZE"],
            warmup_steps=smoke["WARMUP_STEPS"],
            epochs=smoke["INDEX_EPOCHS"],
            target_accuracy=smoke["TARGET_ACCURACY"],
            progress=False,
            device="cpu",
        )
        for scheme in smoke["IDS_SCHEMES"]:
            db, assignment = database_with_ids(image_set, smoke["NS"][0], scheme, seed=0, **id_params(smoke))
            result = index_database(
                db,
                model_overrides=model_overrides(smoke),
                config=config,
                codec=assignment.codec,
                run_dir=Path(runs) / f"smoke-{scheme}",
            )
            rows.append(check("smoke", scheme, db, assignment.codec, result.model, result.seconds, result.epochs))
            print(rows[-1], flush=True)
        if not args.skip_cpu:
            cpu = load_profile("cpu")
            image_set = load_images(cpu["DATASET"], cpu["SIZE"])
            config = TrainConfig(
                lr=cpu["LR"],
                batch_size=cpu["BATCH_SIZE"],
                warmup_steps=cpu["WARMUP_STEPS"],
                epochs=args.cpu_epochs,
                target_accuracy=cpu["TARGET_ACCURACY"],
                stop_metric="train",
                progress=False,
                device="cpu",
            )
            for scheme in args.cpu_ids:
                db, assignment = database_with_ids(image_set, cpu["NS"][0], scheme, seed=0, **id_params(cpu))
                result = index_database(
                    db,
                    model_overrides=model_overrides(cpu),
                    config=config,
                    codec=assignment.codec,
                    run_dir=Path(runs) / f"cpu-{scheme}",
                )
                rows.append(check("cpu", scheme, db, assignment.codec, result.model, result.seconds, result.epochs))
                print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    threads = f" --threads {args.threads}" if args.threads else ""
    md = "\n".join(
        [
            "# Exactness of the incremental beam search on trained models",
            "",
            f"Machine: {describe_machine()}; torch CPU threads {torch.get_num_threads()}; "
            f"{time.perf_counter() - start:.0f} s in all.",
            "",
            "Each model searches every image of its database (indexed images and queries) with `beam_search` "
            "(incremental) and `beam_search_reference` (before issue 17), top-k with beam k = min(100, IDs). "
            f"Per query: `identical` (the same rows in the same order, scores within {TOLERANCE:g}), `tie_swapped` "
            "(scores within the tolerance at every place; rows that differ swap with IDs of the same score to float "
            "precision), `different` (anything else); `max_score_diff` over all places. `top1_is_argmax`: share of "
            "queries whose top-1 with a beam as wide as the index is the argmax of `score_all_ids`. `greedy_equal`: "
            "share of queries whose `greedy_decode` tokens equal greedy decoding with the full decoder. `ia1`: IA@1 "
            "of the model (how well it is trained).",
            "",
            frame.to_markdown(index=False),
            "",
            f"Rerun: `.venv/bin/python benchmarks/check_beam_exactness.py{threads} --cpu-epochs {args.cpu_epochs} "
            f"--cpu-ids {' '.join(args.cpu_ids)}`",
        ]
    )
    stem = out / "beam_exactness"
    write_table(frame, stem, markdown=md)
    print(md)
    print(f"written {stem}.csv and {stem}.md; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
