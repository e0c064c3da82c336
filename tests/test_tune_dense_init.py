"""scripts/tune_dense_init.py: the multi-task variants of a recipe, scored on the val queries."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "tune_dense_init.py"


def load_script():
    spec = importlib.util.spec_from_file_location("tune_dense_init", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_variants_change_the_multitask_phase_of_make_dsi_dense_init():
    """The settings the script had written in before it read recipes/dsi-dense-init.yaml."""
    from vitdsi_utils.studies.recipes import load_recipe
    from vitdsi_utils.training.config import TrainConfig

    script = load_script()
    spec = load_recipe("dsi-dense-init")[0].spec
    for name, (epochs, mix, options, smoothing) in script.VARIANTS.items():
        config, ratio, extra = script.variant_config(spec, name, 3)
        assert config == TrainConfig(
            lr=1e-3, batch_size=32, epochs=epochs, seed=3, label_smoothing=smoothing, progress=False
        )
        assert (ratio, extra) == (mix, options)
    assert spec.max_pairs_per_query == 5


def test_tuning_scores_each_variant_on_the_val_queries(tmp_path):
    from vitdsi_utils.data.database import build_database
    from vitdsi_utils.data.images import load_images
    from vitdsi_utils.phases import index_database
    from vitdsi_utils.training.config import TrainConfig

    db = build_database(load_images("digits", 32, progress=False), 100, id_scheme="clustered", seed=0)
    zero = index_database(
        db,
        model_overrides=dict(dim=16, mlp_dim=32, depth=1, heads=2),
        config=TrainConfig(epochs=1, progress=False),
        run_dir=tmp_path / "model",
    )
    script = load_script()
    common = ["--set", "source=digits", "--set", "size=32", "--set", f"out_dir={tmp_path / 'out'}", "--n", "100"]
    assert (
        script.main(
            [*common, "--model", str(tmp_path / "model" / "zero_shot.pt"), "--variants", "mix-4", "--tag", "tiny"]
        )
        == 0
    )
    long = pd.read_csv(tmp_path / "out" / "tuning_val_N100_tiny.csv")
    assert set(long["variant"]) == {"mix-4"} and set(long["mix_ratio"]) == {4.0} and set(long["epochs"]) == {30}
    assert zero.epochs == 1
    # without --model the dense-init model of the recipe's runs_dir is tuned; a missing one says what to run
    assert script.main([*common, "--set", f"runs_dir={tmp_path / 'none'}"]) == 1
    assert script.main(["--set", "study=dsi"]) == 2
