"""Time the BoVW baseline step by step on Imagenette; write the numbers to reports/benchmarks/.

    .venv/bin/python benchmarks/bench_bovw.py --size 160 --n 2048

The issue's budget: fit + evaluation for N = 2048 at 160 px within 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from vitdsi_utils import metrics, settings
from vitdsi_utils.bovw import BoVW
from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import load_images
from vitdsi_utils.data.relevance import label_relevance
from vitdsi_utils.environment import describe_machine, machine_info
from vitdsi_utils.reports.tables import write_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="imagenette")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--n", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or settings.reports_dir() / "benchmarks")

    rows = []
    start = time.perf_counter()
    image_set = load_images(args.source, args.size, progress=False)
    load_s = time.perf_counter() - start
    for n in args.n:
        db = build_database(image_set, n, seed=0)
        index_images, index_labels = db.split("index")
        test_images, test_labels = db.split("test")
        timings = {"n": n, "n_index": len(index_images), "n_test_queries": len(test_images), "load_images_s": load_s}
        t0 = time.perf_counter()
        model = BoVW(200, random_state=0, progress=False).fit(index_images)
        t1 = time.perf_counter()
        query_vectors = model.transform(test_images)
        t2 = time.perf_counter()
        _, ranked = model.search_vectors(query_vectors, 100)
        t3 = time.perf_counter()
        metrics.evaluate_ranking(ranked, label_relevance(test_labels, index_labels, kind="class"))
        t4 = time.perf_counter()
        timings.update(
            fit_s=t1 - t0,
            descriptors=int(model.n_descriptors_),
            query_features_s=t2 - t1,
            search_s=t3 - t2,
            search_ms_per_query=1000 * (t3 - t2) / len(test_images),
            metrics_s=t4 - t3,
            fit_and_evaluate_s=t4 - t0,
        )
        rows.append(timings)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in timings.items()})

    frame = pd.DataFrame(rows)
    machine = describe_machine()
    md = "\n".join(
        [
            f"# BoVW timings ({args.source}, {args.size} px)",
            "",
            f"Machine: {machine}.",
            "",
            "`fit` = SIFT on the indexed images + k-means (K = 200) + histograms; `query features` = SIFT and",
            "histograms of the test queries; `search` = one cosine matrix product and a sort; budget for",
            "fit + evaluation at N = 2048: 120 s.",
            "",
            frame.round(4).to_markdown(index=False),
            "",
            f"Rerun: `.venv/bin/python benchmarks/bench_bovw.py --size {args.size} --n {' '.join(map(str, args.n))}`",
        ]
    )
    stem = out / f"bovw_{args.source}_{args.size}px_{'gpu' if 'cuda' in machine_info()['device'] else 'cpu'}"
    write_table(frame, stem, markdown=md)
    print(f"written {stem}.md")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
