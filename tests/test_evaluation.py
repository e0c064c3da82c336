import numpy as np
import pandas as pd
import pytest
import torch

from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import load_images
from vitdsi_utils.evaluation import bovw_variant, evaluate_bovw, retrieval_metrics
from vitdsi_utils.reports.paper import attach_paper, paper_table1, paper_value
from vitdsi_utils.studies.bovw import bovw_study, vlad_comparison


def test_paper_table_has_every_cell_of_table1():
    table = paper_table1()
    assert len(table) == 3 * 2 + 12 * 4  # BoVW: MAP@10, R@100; DSI rows: four metrics each
    assert paper_value("DSI zero-shot", 2048, "random", "IA@1") == pytest.approx(0.533)
    assert np.isnan(paper_value("BoVW", 512, "-", "IA@1"))


def test_retrieval_metrics_perfect_and_chance():
    db_labels = np.repeat(np.arange(4), 25)  # 100 database rows, 25 per class
    query_labels = np.array([0, 1, 2, 3])
    perfect = np.stack(
        [np.flatnonzero(db_labels == q).tolist() + np.flatnonzero(db_labels != q).tolist() for q in query_labels]
    )
    table = retrieval_metrics(perfect, query_labels, db_labels).set_index("metric")
    assert table.at["P@10", "value"] == 1.0 and table.at["mAP@10", "value"] == 1.0
    assert table.at["R@100", "value"] == 1.0
    assert table.at["P@10", "chance"] == pytest.approx(0.25)


def test_evaluate_bovw_on_digits_beats_chance():
    db = build_database(load_images("digits", 32, progress=False), 400, seed=0)
    result = evaluate_bovw(db, n_words=32, progress=False)
    table = result.table.set_index("metric")
    assert set(table.index) >= {"P@10", "R@100", "mAP@10"}
    assert ((table["value"] >= 0) & (table["value"] <= 1)).all()
    assert table.at["P@10", "value"] > table.at["P@10", "chance"]
    assert result.timings["n_index"] == 100


def test_bovw_averaged_over_vocabularies_is_the_mean_of_the_single_fits():
    db = build_database(load_images("digits", 32, progress=False), 400, seed=0)
    first, second = (evaluate_bovw(db, n_words=16, seed=seed, progress=False) for seed in (0, 1))
    both = evaluate_bovw(db, n_words=16, seed=0, vocabularies=2, progress=False)
    assert both.timings["vocabularies"] == 2 and first.timings["vocabularies"] == 1
    values = [result.table.set_index("metric")["value"] for result in (first, second, both)]
    assert not np.allclose(values[0], values[1])  # the two vocabularies do rank differently
    for metric in ("P@10", "R@100", "mAP@10"):
        assert values[2][metric] == pytest.approx((values[0][metric] + values[1][metric]) / 2)
    with pytest.raises(ValueError, match="vocabularies must be an integer >= 1"):
        evaluate_bovw(db, n_words=16, vocabularies=0, progress=False)


def test_bovw_study_writes_tables_with_paper_numbers(tmp_path):
    results = bovw_study("digits", 32, ns=[400], seeds=[0], out_dir=tmp_path, n_words=16, progress=False)
    csv = tmp_path / "bovw_digits_32px_K16.csv"
    assert csv.exists() and (tmp_path / "bovw_digits_32px_K16.md").exists()
    assert (tmp_path / "manifests" / "digits-32px-N400-seed0.csv").exists()
    assert pd.read_csv(csv).shape[0] == len(results)
    # no paper numbers exist for N=400, so the paper column is empty
    assert results["paper"].isna().all()


@pytest.mark.parametrize(
    "options, tag",
    [
        ({}, "K200"),
        ({"rootsift": True, "tfidf": True}, "K200_rootsift_tfidf"),
        ({"power_normalisation": True}, "K200_power"),
        ({"encoding": "vlad"}, "K200_vlad"),
        ({"encoding": "vlad", "power_normalisation": True}, "K200_vlad"),  # VLAD's default, not named
        ({"encoding": "vlad", "intra_normalisation": True, "rootsift": True}, "K200_rootsift_vlad_intra"),
        ({"encoding": "vlad", "power_normalisation": False}, "K200_vlad_nopower"),
    ],
)
def test_bovw_variant_names_only_what_differs_from_the_defaults(options, tag):
    assert bovw_variant(200, **options) == tag


def test_cli_vlad_writes_its_tables_and_the_comparison_with_plain_bovw(tmp_path, capsys, run_recipe):
    common = {"study": "bovw", "source": "digits", "size": 32, "ns": [400], "out_dir": str(tmp_path)}
    # the comparison needs plain BoVW with the baseline's words first, and says so
    assert run_recipe({**common, "encoding": "vlad", "words": [8]}) == 2
    assert "no plain BoVW table with 200 words" in capsys.readouterr().err
    # one recipe, several runs: each entry laid over the shared keys
    assert (
        run_recipe(
            {
                **common,
                "runs": [
                    {"words": [200]},
                    {"encoding": "vlad", "words": [4, 8], "intra_norm": True},
                    {"encoding": "vlad", "words": [8], "power_norm": False},
                ],
            }
        )
        == 0
    )
    for variant in ("K200", "K8_vlad", "K4_vlad_intra", "K8_vlad_intra", "K8_vlad_nopower"):
        assert (tmp_path / f"bovw_digits_32px_{variant}.csv").exists(), variant
    vlad = pd.read_csv(tmp_path / "bovw_digits_32px_K8_vlad_intra.csv")
    assert set(vlad["model"]) == {"VLAD"} and set(vlad["dim"]) == {8 * 128} and vlad["paper"].isna().all()
    compared = pd.read_csv(tmp_path / "vlad_digits_32px.csv")
    assert set(compared["variant"]) == {"K200", "K8_vlad", "K4_vlad_intra", "K8_vlad_intra", "K8_vlad_nopower"}
    assert set(compared.loc[compared["variant"] == "K200", "verdict"]) == {"baseline"}
    assert set(compared.loc[compared["variant"] != "K200", "verdict"]) <= {"better", "worse", "overlap"}
    markdown = (tmp_path / "vlad_digits_32px.md").read_text()
    assert "| K8_vlad_nopower | VLAD | 8 | 1024 | 400 | 0 |" in markdown
    # tf-idf weights counts, which VLAD has none of: refused before any image is read
    assert run_recipe({**common, "encoding": "vlad", "tfidf": True}) == 2
    assert "tfidf weights word counts" in capsys.readouterr().err


def test_vlad_comparison_without_vlad_tables_writes_nothing(tmp_path):
    bovw_study("digits", 32, ns=[400], seeds=[0], out_dir=tmp_path, n_words=16, progress=False)
    assert vlad_comparison(tmp_path, "digits", 32) is None
    assert not (tmp_path / "vlad_digits_32px.csv").exists()


def test_attach_paper_matches_like_for_like_rows():
    ours = pd.DataFrame(
        {
            "metric": ["paper MAP@10 (mean P@10, 10 queries)", "mAP@10", "paper R@100 (10 queries)"],
            "model": "BoVW",
            "n": 1024,
            "ids": "-",
            "value": [0.2, 0.1, 0.5],
        }
    )
    merged = attach_paper(ours).set_index("metric")
    assert merged.at["paper MAP@10 (mean P@10, 10 queries)", "paper"] == 0.50
    assert np.isnan(merged.at["mAP@10", "paper"])  # the paper's MAP@10 was not a mAP
    assert merged.at["paper R@100 (10 queries)", "paper"] == 0.825


def test_cli_reports_bad_requests_without_traceback(capsys, run_recipe, tmp_path):
    assert run_recipe({"study": "bovw", "source": "digits", "size": 32, "ns": [99999], "out_dir": str(tmp_path)}) == 2
    err = capsys.readouterr().err
    assert "N=99999 is not possible" in err and "Traceback" not in err
    assert run_recipe({"study": "bovw", "size": 100}) == 2  # refused before any image is read
    err = capsys.readouterr().err
    assert "size: 100 is not one of 32, 64, 160, 256" in err and len(err.strip().splitlines()) == 1


def test_run_experiment_tables_and_reuse_of_finished_runs(tmp_path):
    import warnings

    from vitdsi_utils.reports.tables import FINE_TUNED, ZERO_SHOT
    from vitdsi_utils.studies.dsi import run_experiment
    from vitdsi_utils.training.config import TrainConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        db = build_database(load_images("digits", 32, progress=False), 80, id_scheme="random")
    tiny = dict(patch_size=16, depth=1, dim=32, mlp_dim=64, heads=2, dropout=0.0)
    quick = TrainConfig(epochs=2, progress=False)
    first = run_experiment(db, model_overrides=tiny, index_config=quick, retrieval_config=quick, run_dir=tmp_path, k=10)
    assert (tmp_path / "zero_shot.pt").exists() and (tmp_path / "fine_tuned.pt").exists()
    table = first.table
    assert set(table["model"]) == {ZERO_SHOT, FINE_TUNED}
    assert set(table["metric"]) >= {"IA@1", "IA@5", "P@10", "mAP@10"}
    assert table["value"].between(0, 1).all()
    assert (table["epochs"] == 2).all()
    # a second call loads both phases instead of training again
    second = run_experiment(
        db, model_overrides=tiny, index_config=quick, retrieval_config=quick, run_dir=tmp_path, k=10
    )
    pd.testing.assert_frame_equal(
        first.table.drop(columns=["indexing_eval_s", "search_s", "search_ms_per_query", "train_s"]),
        second.table.drop(columns=["indexing_eval_s", "search_s", "search_ms_per_query", "train_s"]),
    )
    other = build_database(load_images("digits", 32, progress=False), 120, id_scheme="random")
    with pytest.raises(ValueError, match="another database"):
        run_experiment(other, model_overrides=tiny, index_config=quick, run_dir=tmp_path, k=10)


def test_multitask_variant_keeps_indexing_examples_in_every_epoch(tmp_path):
    import warnings

    from vitdsi_utils.reports.tables import FINE_TUNED, MULTITASK, ZERO_SHOT
    from vitdsi_utils.studies.dsi import run_experiment
    from vitdsi_utils.training.checkpoint import load_checkpoint
    from vitdsi_utils.training.config import TrainConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        db = build_database(load_images("digits", 32, progress=False), 80, id_scheme="clustered")
    tiny = dict(patch_size=16, depth=1, dim=32, mlp_dim=64, heads=2, dropout=0.0)
    quick = TrainConfig(epochs=2, progress=False)
    result = run_experiment(
        db,
        model_overrides=tiny,
        index_config=quick,
        retrieval_config=quick,
        run_dir=tmp_path,
        k=10,
        multitask=True,
        mix_ratio=1.5,
    )
    assert set(result.table["model"]) == {ZERO_SHOT, FINE_TUNED, MULTITASK}
    assert (tmp_path / "multitask.pt").exists() and (tmp_path / "fine_tuned.pt").exists()
    frame = result.multitask.history.to_frame()
    train = frame[frame.split == "train"].set_index(["epoch", "task"])["n_examples"]
    assert train.loc[(1, "indexing")] == db.n_index  # every indexed image, every epoch
    assert train.loc[(2, "retrieval")] == round(1.5 * db.n_index)  # pairs resampled to the ratio
    assert set(frame.phase) == {"multitask"} and set(frame[frame.split == "val"].task) == {"retrieval"}
    # the zero-shot model the two variants started from is unchanged by either
    stored = load_checkpoint(tmp_path / "zero_shot.pt")["model"]
    assert all(torch.equal(v, result.zero_shot.model.state_dict()[k]) for k, v in stored.items())


def test_id_scheme_comparison_adds_multitask_models_with_their_own_targets(tmp_path):
    import warnings

    from vitdsi_utils.reports.tables import FINE_TUNED, MULTITASK, ZERO_SHOT
    from vitdsi_utils.studies.ids import compare_id_schemes
    from vitdsi_utils.training.checkpoint import load_checkpoint
    from vitdsi_utils.training.config import TrainConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = load_images("digits", 32, progress=False)
    tiny = dict(patch_size=16, depth=1, dim=32, mlp_dim=64, heads=2, dropout=0.0)

    def quick(seed: int) -> TrainConfig:
        return TrainConfig(epochs=1, progress=False, seed=seed)

    def compare(runs_dir, schemes, fine_tune_phase):
        return compare_id_schemes(
            images,
            [80],
            schemes,
            [0],
            runs_dir=runs_dir,
            index_config=quick,
            retrieval_config=quick,
            model_overrides=tiny,
            k=10,
            fine_tune_phase=fine_tune_phase,
            multitask_config=quick,
            mix_ratio=2.0,
            multitask_targets="same-class",
            log=None,
        )

    results, runs, histories = compare(tmp_path / "both", ["clustered", "atomic"], True)
    assert set(results["model"]) == set(runs["model"]) == {ZERO_SHOT, FINE_TUNED, MULTITASK}
    assert (runs["invalid_beam"] == 0).all() and set(histories["phase"]) >= {"indexing", "retrieval", "multitask"}
    for folder in (tmp_path / "both").iterdir():  # same-class targets for the multi-task model alone
        assert load_checkpoint(folder / "multitask.pt")["extra"]["options"]["targets"] == "same-class"
        assert load_checkpoint(folder / "fine_tuned.pt")["extra"]["options"]["targets"] == "pairs"

    results, runs, _ = compare(tmp_path / "multitask-only", ["atomic"], False)
    assert set(results["model"]) == set(runs["model"]) == {ZERO_SHOT, MULTITASK}
    assert not list((tmp_path / "multitask-only").glob("*/fine_tuned.pt"))


def test_cli_dsi_writes_table1_rows_and_histories(tmp_path, run_recipe):
    out, runs = tmp_path / "dsi", tmp_path / "runs"
    recipe = {
        "study": "dsi",
        "source": "digits",
        "size": 32,
        "ns": [120],
        "schemes": ["random"],
        "index": {"epochs": 2},
        "fine_tune": {"epochs": 1},
        "max_pairs_per_query": 2,
        "out_dir": str(out),
        "runs_dir": str(runs),
    }
    code = run_recipe(recipe)
    assert code == 0
    results = pd.read_csv(out / "dsi_digits_32px.csv")
    assert set(results["model"]) == {"DSI zero-shot", "DSI fine-tuned"}
    histories = pd.read_csv(out / "histories_digits_32px.csv")
    assert set(histories["phase"]) == {"indexing", "retrieval"}
    assert "| DSI zero-shot | 120 | random |" in (out / "dsi_digits_32px.md").read_text()
    # a second call reuses both trained phases and adds the multi-task model with its own epochs
    code = run_recipe(recipe, "multitask={epochs: 2}", "mix_ratio=1.5")
    assert code == 0
    results = pd.read_csv(out / "dsi_digits_32px.csv")
    assert set(results["model"]) == {"DSI zero-shot", "DSI fine-tuned", "DSI multi-task"}
    assert results.groupby("model")["epochs"].first().to_dict() == {
        "DSI zero-shot": 2,
        "DSI fine-tuned": 1,
        "DSI multi-task": 2,
    }
    assert "Multi-task: 2 epochs" in (out / "dsi_digits_32px.md").read_text()


def test_cli_dsi_adds_bovw_and_target3_and_can_skip_plain_fine_tuning(tmp_path, run_recipe):
    out, runs = tmp_path / "dsi", tmp_path / "runs"
    code = run_recipe(
        {
            "study": "dsi",
            "source": "digits",
            "size": 32,
            "ns": [120],
            "schemes": ["clustered", "random"],
            "index": {"epochs": 2},
            "max_pairs_per_query": 2,
            "multitask": {"epochs": 1},
            "mix_ratio": 1,
            "fine_tune": None,
            "bovw": True,
            "bovw_words": 8,
            "bovw_vocabularies": 2,
            "out_dir": str(out),
            "runs_dir": str(runs),
        }
    )
    assert code == 0
    results = pd.read_csv(out / "dsi_digits_32px.csv")
    assert set(results["model"]) == {"BoVW", "DSI zero-shot", "DSI multi-task"}  # no plain fine-tuning
    bovw = results[results["model"] == "BoVW"]
    assert len(bovw[bovw["metric"] == "P@10"]) == 1  # one BoVW row per database, shared by both ID schemes
    text = (out / "dsi_digits_32px.md").read_text()
    assert "## Target 3" in text and "No plain retrieval fine-tuning." in text
    text, target4 = text.split("## Target 4")
    verdicts = [line for line in text.splitlines() if line.startswith("| DSI ")][-4:]
    assert all(line.rstrip().endswith(("| yes |", "| no |")) for line in verdicts)
    # target 4: random minus clustered, for each DSI model, matching the two rows of the table
    gaps = [line.split("|") for line in target4.splitlines() if line.startswith("| DSI ")]
    assert sorted(g[1].strip() for g in gaps) == ["DSI multi-task", "DSI zero-shot"]
    assert all(g[4].strip() == "random" for g in gaps)
    wide = results[(results["metric"] == "mAP@10") & (results["model"] == "DSI zero-shot")].set_index("ids")["value"]
    zero_shot = next(g for g in gaps if g[1].strip() == "DSI zero-shot")
    assert float(zero_shot[6]) == pytest.approx(wide["random"] - wide["clustered"], abs=5e-4)
    assert not any(p.name == "fine_tuned.pt" for p in runs.rglob("*.pt"))


def test_indexing_is_reproducible_from_the_seed():
    import warnings

    import torch

    from vitdsi_utils.phases import index_database
    from vitdsi_utils.training.config import TrainConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        db = build_database(load_images("digits", 32, progress=False), 80, id_scheme="random")
    tiny = dict(patch_size=16, depth=1, dim=32, mlp_dim=64, heads=2)
    runs = [
        index_database(db, model_overrides=tiny, config=TrainConfig(epochs=2, progress=False, seed=3)) for _ in range(2)
    ]
    for a, b in zip(runs[0].model.state_dict().values(), runs[1].model.state_dict().values()):
        assert torch.equal(a, b)


def test_attach_paper_twice_is_attaching_once():
    import pandas as pd

    from vitdsi_utils.reports.paper import attach_paper

    rows = pd.DataFrame(
        {
            "model": ["DSI zero-shot", "BoVW"],
            "n": [512, 512],
            "ids": ["clustered", "-"],
            "metric": ["IA@1", "mAP@10"],
            "value": [0.9, 0.1],
            "source": ["imagenette"] * 2,
        }
    )
    once = attach_paper(rows)
    assert once.loc[0, "paper"] == pytest.approx(0.833)  # the paper's zero-shot IA@1, N = 512, clustered
    pd.testing.assert_frame_equal(attach_paper(once), once)


def test_evaluate_dsi_averages_a_list_of_models_per_query():
    """Several training seeds of one recipe: each metric is the per-query mean over the models."""
    import torch

    from vitdsi_utils.data.database import build_database
    from vitdsi_utils.data.images import load_images
    from vitdsi_utils.evaluation import evaluate_dsi
    from vitdsi_utils.ids.schemes import codec_for
    from vitdsi_utils.model.vit import DSIConfig, DSIModel

    db = build_database(load_images("digits", 32, progress=False), 100, seed=0)
    codec = codec_for(db)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(DSIModel(DSIConfig.from_codec(codec, image_size=32, dim=16, mlp_dim=32, depth=1, heads=2)))
    singles = [evaluate_dsi(m, codec, db, k=20)[0].set_index("metric")["value"] for m in models]
    both = evaluate_dsi(models, codec, db, k=20)[0].set_index("metric")
    for metric in ("IA@1", "IA@5", "mAP@10", "P@10", "R@100"):
        assert both.loc[metric, "value"] == pytest.approx((singles[0][metric] + singles[1][metric]) / 2)
        assert both.loc[metric, "ci_low"] <= both.loc[metric, "value"] <= both.loc[metric, "ci_high"]
    same = evaluate_dsi([models[0], models[0]], codec, db, k=20)[0].set_index("metric")["value"]
    assert np.allclose(same.to_numpy(dtype=float), singles[0].to_numpy(dtype=float), equal_nan=True)
    with pytest.raises(ValueError, match="non-empty list"):
        evaluate_dsi([], codec, db)


def test_cli_dsi_trains_atomic_ids_beside_clustered_on_the_same_images(tmp_path, run_recipe):
    out, runs = tmp_path / "dsi", tmp_path / "runs"
    code = run_recipe(
        {
            "study": "dsi",
            "source": "digits",
            "size": 32,
            "ns": [120],
            "schemes": ["clustered", "atomic"],
            "index": {"epochs": 2},
            "max_pairs_per_query": 2,
            "fine_tune": None,
            "out_dir": str(out),
            "runs_dir": str(runs),
        }
    )
    assert code == 0
    results = pd.read_csv(out / "dsi_digits_32px.csv")
    assert set(results["ids"]) == {"clustered", "atomic"}
    assert sorted(p.name for p in runs.iterdir()) == [
        "digits-32px-N120-atomic-seed0",
        "digits-32px-N120-clustered-seed0",
    ]
    from vitdsi_utils.training.checkpoint import load_model

    model, codec, _ = load_model(runs / "digits-32px-N120-atomic-seed0" / "zero_shot.pt")
    assert len(codec) == 30 and codec.max_length == 2  # 30 indexed images, one token each + EOS
    assert model.config.vocab_size == 30 + 3
    text = (out / "dsi_digits_32px.md").read_text()
    assert "## Target 4" in text and "| atomic |" in text.split("## Target 4")[1]


def test_dsi_study_names_the_unknown_scheme():
    from vitdsi_utils.studies.dsi import DSISpec, _dsi_study

    with pytest.raises(ValueError, match="schemes: 'hashed' is not one of random, clustered, semantic, rq, atomic"):
        DSISpec(source="digits", size=32, ns=(120,), schemes=("clustered", "hashed"))
    with pytest.raises(ValueError, match="unknown ID scheme"):
        _dsi_study("digits", 32, ns=(120,), schemes=("clustered", "hashed"))
