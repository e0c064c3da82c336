"""Ablation grids: one factor at a time, the run, the table, its merge and the figure."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from vitdsi_utils.data.images import load_images
from vitdsi_utils.studies.ablations import AblationsSpec, Variant, ablation_grid, merge_results, run_ablations
from vitdsi_utils.studies.ablations_report import (
    FINE_TUNED,
    ZERO_SHOT,
    ablation_figure,
    ablations_markdown,
    describe,
    summary_table,
)
from vitdsi_utils.studies.specs import build_spec
from vitdsi_utils.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = dict(patch_size=16, dim=16, mlp_dim=32, depth=1, heads=2, dropout=0.1, pos_encoding="sinusoidal")


def differences(variant: Variant, default: Variant) -> dict:
    a, b = dataclasses.asdict(variant), dataclasses.asdict(default)
    out = {k: a[k] for k in a if k not in ("factor", "level", "model") and a[k] != b[k]}
    out.update({k: v for k, v in a["model"].items() if b["model"].get(k) != v})
    return out


def test_grid_changes_one_factor_at_a_time():
    grid = ablation_grid(base_model=BASE)
    default = grid[0]
    assert default.name == "default" and default.model == BASE
    names = [v.name for v in grid]
    assert len(names) == len(set(names))
    # the default's own levels (sinusoidal, 16, 0.1, 25%) are not repeated
    assert "pos: sinusoidal" not in names and "patch: 16" not in names and "dropout: 0.1" not in names
    assert "index-share: 25%" not in names
    for variant in grid[1:]:
        changed = differences(variant, default)
        if variant.factor == "mix":  # the multi-task model at one mix ratio
            assert set(changed) == {"multitask", "mix_ratio"}
        else:
            assert len(changed) == 1, (variant.name, changed)


def test_grid_levels_and_errors():
    grid = ablation_grid(["patch", "options"], base_model=BASE, levels={"patch": ["32"]})
    assert [v.name for v in grid] == [
        "default",
        "patch: 32",
        "options: index views",
        "options: same-class targets",
        "options: label smoothing 0.1",
    ]
    with pytest.raises(ValueError, match="unknown ablation factors"):
        ablation_grid(["patches"])
    with pytest.raises(ValueError, match="has levels"):
        ablation_grid(["patch"], levels={"patch": ["12"]})


def test_variants_of_the_fine_tuning_share_the_default_indexed_model():
    grid = ablation_grid(["mix", "options", "dropout"], base_model=BASE)
    tags = {v.name: v.index_tag(BASE) for v in grid}
    assert tags["default"] == "" and tags["mix: multi-task 2"] == "" and tags["options: index views"] == ""
    assert tags["dropout: 0"] == "dropout0.0"
    ft = {v.name: v.fine_tune_tag() for v in grid}
    assert ft["default"] == "" and ft["mix: multi-task 4"] == "multitask4"
    assert len(set(ft.values())) == len(ft) - 2  # the two dropout variants fine-tune plainly, like the default


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    image_set = load_images("digits", 32, progress=False)
    grid = ablation_grid(
        ["patch", "options"], base_model=BASE, levels={"patch": ["32"], "options": ["same-class targets"]}
    )
    runs = tmp_path_factory.mktemp("runs")
    seen = []
    long = run_ablations(
        image_set,
        grid,
        n=80,
        base_model=BASE,
        index_config=TrainConfig(epochs=2, progress=False),
        retrieval_config=TrainConfig(epochs=1, progress=False),
        max_pairs_per_query=2,
        runs_dir=runs,
        progress=False,
        on_variant=seen.append,
    )
    return long, runs, seen, image_set, grid


def test_run_gives_both_stages_of_every_variant(small_run):
    long, runs, seen, _, _ = small_run
    assert list(dict.fromkeys(long["variant"])) == ["default", "patch: 32", "options: same-class targets"]
    assert [len(set(frame["variant"])) for frame in seen] == [1, 2, 3]
    for _, group in long.groupby("variant"):
        assert set(group["stage"]) == {ZERO_SHOT, FINE_TUNED}
        assert {"IA@1", "mAP@10", "P@10", "R@100"} <= set(group["metric"])
    ia = long[(long["metric"] == "IA@1") & (long["stage"] == ZERO_SHOT)].set_index("variant")["value"]
    # the fine-tuning option reuses the default's indexed model: same zero-shot numbers
    assert ia["options: same-class targets"] == ia["default"]
    # the default lives where the DSI study (recipes/dsi.yaml) puts its models; variants below it
    root = next(runs.iterdir())
    assert (root / "zero_shot.pt").exists() and (root / "fine_tuned.pt").exists()
    assert (root / "ablations" / "patch_size32" / "zero_shot.pt").exists()
    assert (root / "ablations" / "same-class" / "fine_tuned.pt").exists()


def test_summary_markdown_and_figure(small_run):
    long = small_run[0]
    summary = summary_table(long, intervals=False)
    assert list(summary["variant"]) == ["default", "patch: 32", "options: same-class targets"]
    assert summary["epochs to memorise"].between(1, 2).all()
    assert summary["tuned mAP@10"].between(0, 1).all()
    text = ablations_markdown(long, "settings here")
    assert text.startswith("settings here") and "| options: same-class targets |" in text and "[" in text
    assert len(describe(long)) == 2
    fig = ablation_figure(long, index_cap=2)
    assert len(fig.axes) == 3
    assert sum(bar.get_hatch() == "//" for bar in fig.axes[2].patches) == (summary["epochs to memorise"] >= 2).sum()


def test_rerun_loads_the_models(small_run):
    long, runs, _, image_set, grid = small_run
    again = run_ablations(
        image_set,
        grid,
        n=80,
        base_model=BASE,
        index_config=TrainConfig(epochs=2, progress=False),
        retrieval_config=TrainConfig(epochs=1, progress=False),
        max_pairs_per_query=2,
        runs_dir=runs,
        progress=False,
    )
    pd.testing.assert_series_equal(again["value"], long["value"])


def test_merge_keeps_other_variants_of_the_same_settings_only(small_run, tmp_path):
    long = small_run[0]
    path = tmp_path / "table.csv"
    first = merge_results(long[long["variant"] != "patch: 32"], path, {"n": 80})
    first.to_csv(path, index=False)
    merged = merge_results(long[long["variant"] == "patch: 32"], path, {"n": 80})
    assert list(dict.fromkeys(merged["variant"])) == ["default", "patch: 32", "options: same-class targets"]
    other = merge_results(long[long["variant"] == "patch: 32"], path, {"n": 160})
    assert set(other["variant"]) == {"patch: 32"}


def test_ablations_recipe(tmp_path, run_recipe, capsys):
    spec = build_spec(AblationsSpec, {"factors": ["pos"], "levels": {"pos": ["learned"]}})
    assert spec.factors == ("pos",) and spec.levels == {"pos": ("learned",)}
    assert spec.n == 512 and spec.index.epochs == 150 and spec.fine_tune.epochs == 10
    common = {"study": "ablations", "source": "digits", "size": 32, "out_dir": str(tmp_path)}
    assert run_recipe({**common, "levels": "patch"}) == 2  # a factor without its levels
    assert "levels: expected a mapping" in capsys.readouterr().err
    assert run_recipe({**common, "levels": {"patch": [12]}}) == 2
    assert "factor 'patch' has levels ['8', '16', '32']" in capsys.readouterr().err
    assert not any(tmp_path.glob("ablations_*"))
