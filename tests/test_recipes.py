"""Recipes and specs: `vitdsi run recipes/<name>.yaml` passes the studies what the old per-study verbs passed.

tests/fixtures/cli_calls.json holds, for every make target that ran a study, the arguments the old CLI
(``vitdsi dsi --size 64 ...``, recorded with main at c3cfbe3) passed to the study functions. Here the
same targets' commands of today's Makefile run through the same recorders: every TrainConfig, N, seed,
ID scheme, model override and folder must match, so results do not move and trained models are found.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from vitdsi_utils import cli

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "fixtures" / "cli_calls.py"


def load_harness():
    spec = importlib.util.spec_from_file_location("cli_calls", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("cli_calls", module)
    spec.loader.exec_module(module)
    return module


harness = load_harness()
FIXTURE = json.loads(harness.FIXTURE.read_text())
TARGETS = [k for k in FIXTURE if not k.startswith("_")]


def effective(call: dict) -> dict:
    """A recorded call without the arguments its study never reads.

    ``dsi_study``: ``retrieval_config`` only trains the plain fine-tuned model and is the fallback of the
    multi-task one, so with ``fine_tune_phase`` off and a ``multitask_config`` given it is unused;
    ``multitask_config`` is unused without ``multitask`` (the old CLI always passed one of each).
    ``scale_study`` with ``keep_ia`` trains nothing: ``ia_ns``, ``index_config`` and ``runs_dir`` are unused
    (its ``device`` and ``amp`` arguments, which the latency uses, are compared).
    ``pretrain_study``: ``name`` came after the recording (the fixture cannot be re-recorded: its ``--capture``
    needs the old per-study CLI); a recipe never sets it (a profile-only setting), so it is compared only when
    set, and then it fails the comparison.
    """
    args = dict(call["arguments"])
    if call["function"] == "scale_study" and args["keep_ia"]:
        for unused in ("ia_ns", "index_config", "runs_dir"):  # nothing is trained
            args.pop(unused)
    if call["function"] == "pretrain_study" and args.get("name") is None:
        args.pop("name", None)  # the old CLI had no name to pass; None is load_images' own default
    if call["function"] == "dsi_study":
        if not args["fine_tune_phase"] and args["multitask_config"] is not None:
            args.pop("retrieval_config")
        if not args["multitask"]:
            args.pop("multitask_config")
    return {"function": call["function"], "arguments": args}


@pytest.fixture
def at_project_root(monkeypatch):
    """The Makefile's working directory and default folders (reports/ and data/ of the project)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("VITDSI_REPORTS_DIR", raising=False)
    monkeypatch.delenv("VITDSI_DATA_DIR", raising=False)


def test_the_fixture_covers_every_make_target_that_runs_a_study():
    text = (ROOT / "Makefile").read_text()
    targets = {
        line.split(":")[0]
        for line in text.splitlines()
        if line and not line.startswith(("\t", "#", " ")) and ": venv" in line
    }
    studies = {
        t
        for t in targets
        if any(
            "vitdsi run recipes/" in line for line in text.split(f"\n{t}: venv", 1)[1].split("\n\n", 1)[0].splitlines()
        )
    }
    assert studies == set(TARGETS) - {"ablations-patch8"}


@pytest.mark.parametrize("target", TARGETS)
def test_the_recipes_pass_the_studies_what_the_old_cli_passed(target, at_project_root, monkeypatch, capsys):
    commands = harness.make_commands(target)
    assert commands and all(argv[:2] == ["run", f"recipes/{argv[1].split('/')[-1]}"] for argv in commands)
    recorder = harness.recipe_recorder(monkeypatch.setattr)
    for argv in commands:
        assert cli.main(argv) == 0, capsys.readouterr().err
    calls = recorder.calls
    expected = [call for run in FIXTURE[target] for call in run["calls"]]
    assert [c["function"] for c in calls] == [c["function"] for c in expected]
    for ours, theirs in zip(calls, expected):
        assert effective(ours) == effective(theirs)


# ------------------------------------------------------------------------------------------
# The loader: one-line errors that name the key, exit status 2
# ------------------------------------------------------------------------------------------
def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "values, message",
    [
        ({"study": "dsi", "epochs": 3}, "unknown key epochs for study dsi; allowed: annotations, bovw, "),
        ({"study": "dsi", "index": {"epoch": 3}}, "unknown key index.epoch; allowed in index: amp, batch_size, "),
        ({"study": "dsi", "model": {"patch": 8}}, "unknown key model.patch; allowed in model: depth, dim, "),
        ({"study": "dsi", "ns": "many"}, "ns: expected a list of integers, got 'many' (str)"),
        ({"study": "dsi", "ns": [512, 1.5]}, "ns: expected a list of integers, got [512, 1.5] (list)"),
        ({"study": "dsi", "index": {"lr": "fast"}}, "index.lr: expected a number, got 'fast' (str)"),
        ({"study": "dsi", "index": {"lr": -1}}, "index.lr: must be > 0, got -1"),
        ({"study": "dsi", "index": {"target_accuracy": 2}}, "index.target_accuracy: must lie in (0, 1], got 2"),
        ({"study": "dsi", "index": {"epochs": 0}}, "index.epochs: must be an integer >= 1, got 0"),
        ({"study": "dense", "train": {"batch_size": 0}}, "train.batch_size: must be an integer >= 1, got 0"),
        ({"study": "pretrain", "ssl": {"lr": 0}}, "ssl.lr: must be > 0, got 0"),
        ({"study": "dsi", "bovw": "yes"}, "bovw: expected true or false, got 'yes' (str)"),
        ({"study": "dsi", "index": 400}, "index: expected a mapping (TrainConfig settings), got 400 (int)"),
        ({"study": "dsi", "schemes": ["clustered", "hashed"]}, "schemes: 'hashed' is not one of random, clustered"),
        ({"study": "dsi", "model": {"pooling": "cls"}}, "model.pooling: the DSI has no pooling setting"),
        ({"study": "dense", "model": {"pooling": "max"}}, "model.pooling: 'max' is not one of mean, cls"),
        ({"study": "hashing"}, "study: unknown study 'hashing'; allowed: bovw, dsi, ablations, dense, dense-init"),
        ({"size": 64}, "no study: name one with study: bovw | dsi"),
        ({"study": "dsi", "out_dir": 3}, "out_dir: expected a folder path, got 3 (int)"),
        ({"study": "dsi", "runs": [{"extends": "x.yaml"}]}, "extends belongs at the top of the file, not in a run"),
        ({"study": "dsi", "runs": {"size": 64}}, "runs: expected a list of mappings (one per run)"),
        # settings only a notebook profile's study reads: a recipe's run would ignore them
        ({"study": "dense", "name": "pets"}, "name: read by a notebook profile's study only, not by a recipe"),
        ({"study": "dsi", "name": "pets"}, "name: read by a notebook profile's study only, not by a recipe"),
        ({"study": "ablations", "name": "pets"}, "name: read by a notebook profile's study only, not by a recipe"),
        ({"study": "bovw", "name": "pets"}, "name: read by a notebook profile's study only, not by a recipe"),
        ({"study": "bovw", "vlad_words": 8}, "vlad_words: read by a notebook profile's study only, not by a recipe"),
        ({"study": "incremental", "name": "pets"}, "name: read by a notebook profile's study only, not by a recipe"),
        ({"study": "pretrain", "name": "pets"}, "name: read by a notebook profile's study only, not by a recipe"),
        ({"study": "dense-init", "include_index": False}, "include_index: read by a notebook profile's study only"),
    ],
)
def test_a_bad_recipe_is_refused_in_one_line_naming_the_key(values, message, run_recipe, capsys):
    assert run_recipe(values) == 2
    err = one_line_error(capsys)
    assert err.startswith("vitdsi run: error: ") and "recipe-0.yaml: " in err and message in err, err


def test_numbers_in_yaml_and_a_quoted_number(tmp_path, capsys):
    from vitdsi_utils.studies.recipes import load_recipe

    path = tmp_path / "numbers.yaml"
    path.write_text("study: dsi\nindex: {lr: 1e-3, target_accuracy: 9.9E-1}\nmix_ratio: 2\n")
    spec = load_recipe(path)[0].spec
    assert (spec.index.lr, spec.index.target_accuracy, spec.mix_ratio) == (1e-3, 0.99, 2.0)
    path.write_text('study: dsi\nindex: {lr: "1e-3"}\n')
    assert cli.main(["run", str(path)]) == 2
    assert "index.lr: expected a number, got '1e-3' (str); write the number without quotes" in one_line_error(capsys)


def test_the_allowed_keys_are_the_spec_and_run_keys(run_recipe, capsys):
    assert run_recipe({"study": "incremental", "replay": [0]}) == 2
    allowed = one_line_error(capsys).split("allowed: ")[1].split(", ")
    assert allowed == sorted(
        [
            "annotations",
            "finetune_epochs",
            "ids",
            "index",
            "k",
            "model",
            "name",
            "new_fraction",
            "ns",
            "out_dir",
            "replay_ratios",
            "root",
            "runs_dir",
            "seed",
            "size",
            "source",
            "study",
        ]
    )


def test_a_missing_or_broken_recipe_file_is_one_line(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "nope.yaml")]) == 2
    err = one_line_error(capsys)
    assert "recipe " in err and "nope.yaml" in err and "does not exist; recipes in " in err and "dsi-patch8" in err
    assert cli.main(["run", "no-such-recipe"]) == 2
    one_line_error(capsys)
    broken = tmp_path / "broken.yaml"
    broken.write_text("study: dsi\nns: [512\n")
    assert cli.main(["run", str(broken)]) == 2
    assert "broken.yaml: not valid YAML (line " in one_line_error(capsys)
    broken.write_text("- study: dsi\n")
    assert cli.main(["run", str(broken)]) == 2
    assert "a recipe is a mapping of keys" in one_line_error(capsys)
    looping = tmp_path / "loop.yaml"
    looping.write_text("extends: loop.yaml\nstudy: dsi\n")
    assert cli.main(["run", str(looping)]) == 2
    assert "extends itself" in one_line_error(capsys)


def test_set_changes_every_run_of_a_recipe(tmp_path, capsys):
    import yaml

    argv = [
        "run",
        "recipes/bovw.yaml",
        "--dry-run",
        "--set",
        "size=64",
        "--set",
        "ns=512",
        "--set",
        f"out_dir={tmp_path}",
    ]
    assert cli.main(argv) == 0
    runs = [doc for doc in yaml.safe_load_all(capsys.readouterr().out) if doc]
    assert len(runs) == 3
    assert all(r["size"] == 64 and r["ns"] == [512] and r["out_dir"] == str(tmp_path) for r in runs)
    assert [r["seeds"] for r in runs] == [[0, 1, 2], [0, 1, 2], [0]] and runs[2]["words"] == [1000]
    # sections: one key of a section, or the whole section; YAML values (1e-3 is a number)
    assert (
        cli.main(
            [
                "run",
                "recipes/dsi.yaml",
                "--dry-run",
                "--set",
                "index.epochs=7",
                "--set",
                "fine_tune.lr=2e-3",
                "--set",
                "multitask={epochs: 3}",
                "--set",
                "mix_ratio=1.5",
            ]
        )
        == 0
    )
    run = yaml.safe_load(capsys.readouterr().out.split("---")[0])
    assert (run["index"]["epochs"], run["index"]["lr"], run["index"]["warmup_steps"]) == (7, 1e-3, 100)
    assert run["fine_tune"]["lr"] == 2e-3 and run["multitask"]["epochs"] == 3 and run["mix_ratio"] == 1.5
    assert cli.main(["run", "recipes/dsi.yaml", "--dry-run", "--set", "fine_tune=null"]) == 0
    assert yaml.safe_load(capsys.readouterr().out.split("---")[0])["fine_tune"] is None
    # the list of runs as a whole: one run of the shared keys
    assert cli.main(["run", "recipes/vlad.yaml", "--dry-run", "--set", "runs=[{encoding: vlad, words: [32]}]"]) == 0
    runs = [doc for doc in yaml.safe_load_all(capsys.readouterr().out) if doc]
    assert len(runs) == 1 and (runs[0]["encoding"], runs[0]["words"], runs[0]["size"]) == ("vlad", [32], 64)
    assert cli.main(["run", "recipes/vlad.yaml", "--dry-run", "--set", "runs.words=[8]"]) == 2
    assert "only the whole list of runs can be set" in one_line_error(capsys)


@pytest.mark.parametrize(
    "item, message",
    [
        ("size", "--set takes KEY=VALUE"),
        ("=3", "--set takes KEY=VALUE"),
        ("ns=[512", "--set ns: '[512' is not a YAML value"),
        ("index.epoch=3", "unknown key index.epoch"),
        ("size.x=3", "--set size.x: size is 64, not a section with keys"),
        ("size=twelve", "size: expected an integer, got 'twelve' (str)"),
    ],
)
def test_a_bad_set_is_refused_in_one_line(item, message, capsys):
    assert cli.main(["run", "recipes/dsi.yaml", "--dry-run", "--set", item]) == 2
    assert message in one_line_error(capsys)


def test_dry_run_prints_every_setting_and_reads_back_as_the_same_specs(tmp_path, capsys):
    from vitdsi_utils.studies.recipes import build_run, list_recipes, load_recipe
    from vitdsi_utils.studies.specs import load_yaml

    names = [name for name, _ in list_recipes()]
    assert names == sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml")) and len(names) >= 17
    for name in names:
        runs = load_recipe(name)
        assert cli.main(["run", name, "--dry-run"]) == 0
        printed = [load_yaml(doc) for doc in capsys.readouterr().out.split("---\n") if doc.strip()]
        assert [build_run(doc).spec for doc in printed] == [run.spec for run in runs], name
        assert [str(build_run(doc).paths.out) for doc in printed] == [str(run.paths.out) for run in runs]


def test_recipes_lists_every_recipe_with_what_it_runs(capsys):
    assert cli.main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    assert [line.split()[0] for line in lines] == names
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)  # each says what it runs


def test_every_recipe_says_what_it_runs_and_where_it_writes():
    from vitdsi_utils.studies.recipes import load_recipe

    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        text = path.read_text()
        assert text.startswith("# "), path.name
        for run in load_recipe(path):
            assert str(run.paths.out) in text or "extends:" in text, path.name


def test_python_m_vitdsi_utils_runs_the_cli():
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "vitdsi_utils", "run", "dsi", "--dry-run", "--set", "ns=[512]"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "ns: [512]" in done.stdout, done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "vitdsi_utils", "run", "dsi", "--set", "nope=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "unknown key nope" in done.stderr


# ------------------------------------------------------------------------------------------
# Specs: defaults, profiles
# ------------------------------------------------------------------------------------------
def test_spec_defaults_are_the_old_cli_defaults():
    """`vitdsi dsi` without flags: the paper's recipe at 160 px (and likewise for the other studies)."""
    from vitdsi_utils.studies.ablations import AblationsSpec
    from vitdsi_utils.studies.bovw import BoVWSpec
    from vitdsi_utils.studies.dense import DenseSpec
    from vitdsi_utils.studies.dense_init import DenseInitSpec
    from vitdsi_utils.studies.dsi import DSISpec
    from vitdsi_utils.studies.incremental import IncrementalSpec
    from vitdsi_utils.studies.pretrain import PretrainSpec
    from vitdsi_utils.studies.scale import ScaleSpec
    from vitdsi_utils.training.config import TrainConfig

    dsi = DSISpec()
    assert (dsi.size, dsi.ns, dsi.schemes, dsi.seeds) == (160, (512, 1024, 2048), ("clustered", "random"), (0,))
    assert dsi.index == TrainConfig(epochs=1000, lr=5e-4, target_accuracy=0.98, warmup_steps=0)
    assert dsi.fine_tune == TrainConfig(epochs=75, lr=5e-4) and dsi.multitask is None
    assert dsi.model.overrides() == {"patch_size": 16, "dropout": 0.1, "pos_encoding": "sinusoidal"}
    assert (dsi.max_pairs_per_query, dsi.bovw, dsi.bovw_vocabularies) == (None, False, 5)
    bovw = BoVWSpec()
    assert (bovw.size, bovw.words, bovw.encoding, bovw.vocabularies) == (160, None, "histogram", 5)
    ablations = AblationsSpec()
    assert (ablations.size, ablations.n, ablations.index.epochs, ablations.fine_tune.epochs) == (64, 512, 150, 10)
    dense = DenseSpec()
    assert (dense.train.epochs, dense.train.lr, dense.schemes, dense.model.pooling) == (
        90,
        5e-4,
        ("clustered",),
        "mean",
    )
    init = DenseInitSpec()
    assert (init.index.epochs, init.multitask.epochs, init.mix_ratio, init.dense.epochs) == (400, 30, 2.0, 90)
    pretrain = PretrainSpec()
    assert (pretrain.ssl.epochs, pretrain.ssl.batch_size, pretrain.n, pretrain.scratch) == (4, 128, 512, False)
    scale = ScaleSpec()
    assert (scale.size, scale.ia_ns, scale.index.epochs, scale.index.device, scale.index.amp) == (
        64,
        (512,),
        100,
        "auto",
        True,
    )
    incremental = IncrementalSpec()
    assert (incremental.ns, incremental.index.epochs, incremental.finetune_epochs) == ((1024,), 200, 40)


def test_specs_from_the_notebook_profiles():
    from vitdsi_utils.runner.profiles import load_profile
    from vitdsi_utils.studies.ablations import AblationsSpec
    from vitdsi_utils.studies.bovw import BoVWSpec
    from vitdsi_utils.studies.clusters import ClustersSpec
    from vitdsi_utils.studies.data import DataSpec
    from vitdsi_utils.studies.dense import DenseSpec
    from vitdsi_utils.studies.dense_init import DenseInitSpec
    from vitdsi_utils.studies.dsi import DSISpec
    from vitdsi_utils.studies.ids import IdsSpec
    from vitdsi_utils.studies.incremental import IncrementalSpec
    from vitdsi_utils.studies.pretrain import PretrainSpec
    from vitdsi_utils.studies.results import ResultsSpec
    from vitdsi_utils.studies.scale import ScaleSpec
    from vitdsi_utils.studies.specs import SpecError, spec_from_profile

    cpu = load_profile("cpu")
    specs = (
        AblationsSpec,
        BoVWSpec,
        ClustersSpec,
        DataSpec,
        DenseSpec,
        DenseInitSpec,
        DSISpec,
        IdsSpec,
        IncrementalSpec,
        PretrainSpec,
        ResultsSpec,
    )
    for cls in (*specs, ScaleSpec):
        for name in ("smoke", "cpu", "paper"):
            spec_from_profile(cls, load_profile(name), ignore_unknown=True)  # every bundled profile fits
    dsi = spec_from_profile(DSISpec, cpu, ignore_unknown=True)
    assert (dsi.size, dsi.ns, dsi.schemes, dsi.max_pairs_per_query) == (64, (512, 1024), ("clustered", "random"), 5)
    assert (dsi.index.lr, dsi.fine_tune.lr, dsi.index.epochs, dsi.fine_tune.epochs) == (1e-3, 1e-3, 400, 10)
    assert dsi.model.overrides()["dim"] == 128
    bovw = spec_from_profile(BoVWSpec, cpu, ignore_unknown=True)
    assert (bovw.words, bovw.vocabularies, bovw.ns) == ((200,), 5, (512, 1024))
    inc = spec_from_profile(IncrementalSpec, cpu, ignore_unknown=True)
    assert (inc.ns, inc.replay_ratios, inc.seed, inc.index.seed) == ((512,), (0.0, 1.0), 0, 0)
    scale = spec_from_profile(ScaleSpec, {"SCALE_QUERIES": 32, "SEEDS": [3]})
    assert (scale.queries, scale.query_batch, scale.seed, scale.index.seed) == (32, 32, 3, 3)
    with pytest.raises(SpecError, match="profile key PROFILE is not used by ScaleSpec; allowed: BATCH_SIZE, "):
        spec_from_profile(ScaleSpec, cpu)
    with pytest.raises(SpecError, match=r"profile key SCALE_NS \(ns: expected a list of integers, got 'all'"):
        spec_from_profile(ScaleSpec, {"SCALE_NS": "all"})


def test_a_notebook_builds_its_spec_from_its_upper_case_names():
    from vitdsi_utils.studies.ablations import AblationsSpec
    from vitdsi_utils.studies.clusters import ClustersSpec
    from vitdsi_utils.studies.dense import DenseSpec
    from vitdsi_utils.studies.dense_init import DenseInitSpec
    from vitdsi_utils.studies.dsi import DSISpec
    from vitdsi_utils.studies.results import ResultsSpec
    from vitdsi_utils.studies.specs import SpecError, notebook_spec

    namespace = {
        "PROFILE": "smoke",  # no spec key: left out
        "DATASET": "digits",
        "DATASET_NAME": "my-digits",
        "SIZE": 32,
        "NS": [200],
        "ID_SCHEMES": ["random", "clustered"],
        "SEEDS": [3],
        "K": 50,
        "DENSE_MARGIN": 0.3,
        "DENSE_TRAIN_ON_INDEX": False,
        "size": 160,  # not a parameter: lower case
        "_SIZE": 160,  # nor a private name
        "In": [],  # IPython's
    }
    dense = notebook_spec(DenseSpec, namespace)
    assert (dense.source, dense.name, dense.size, dense.ns, dense.schemes) == (
        "digits",
        "my-digits",
        32,
        (200,),
        ("random", "clustered"),
    )
    assert (dense.seeds, dense.train.seed, dense.k, dense.train.margin, dense.include_index) == (
        (3,),
        3,
        50,
        0.3,
        False,
    )
    dsi = notebook_spec(DSISpec, namespace)  # notebooks 03 and 04
    assert (dsi.name, dsi.schemes, dsi.seeds) == ("my-digits", ("random", "clustered"), (3,))
    ablation = notebook_spec(AblationsSpec, {**namespace, "ABLATION_N": 100})  # notebook 10
    assert (ablation.name, ablation.k, ablation.n, ablation.seed, ablation.fine_tune.seed) == (
        "my-digits",
        50,
        100,
        3,
        3,
    )
    table1 = notebook_spec(ResultsSpec, namespace)  # notebook 05
    assert (table1.name, table1.size, table1.k, table1.schemes) == ("my-digits", 32, 50, ("random", "clustered"))
    init = notebook_spec(DenseInitSpec, namespace)
    assert (init.dense_scheme, init.dense.margin, init.include_index, init.k) == ("random", 0.3, False, 50)
    clusters = notebook_spec(ClustersSpec, {**namespace, "CLUSTER_KS": [2, 4], "CLUSTER_N": None})
    assert (clusters.seed, clusters.ks, clusters.n, clusters.schemes) == (3, (2, 4), None, ("random", "clustered"))
    with pytest.raises(SpecError, match=r"profile key CLUSTER_N \(n: 512 is not one of ns = \[200\]"):
        notebook_spec(ClustersSpec, {**namespace, "CLUSTER_N": 512})


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every `vitdsi run ...` command written in the docs, the reports' READMEs and the recipes' comments."""
    import re
    import shlex

    files = [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "reports").glob("**/README.md")),
        *sorted((ROOT / "recipes").glob("*.yaml")),
    ]
    found = []
    for path in files:
        text = path.read_text().replace("\\\n", " ")
        inline = re.findall(r"`(?:\.venv/bin/)?vitdsi run ([^`]+)`", text)
        lines = re.findall(r"^[#\s]*(?:\.venv/bin/)?vitdsi run (.+)$", text, flags=re.M)
        for command in inline + lines:
            command = re.split(r"\s+#", command)[0].strip().rstrip(";:,.)")
            if "<" in command or command.split()[0].isupper() or command.startswith("RECIPE"):
                continue  # a pattern such as recipes/<name>.yaml, not a command
            found.append((path.relative_to(ROOT).as_posix(), shlex.split(command)))
    return found


def test_every_documented_command_builds_its_runs(at_project_root, capsys):
    commands = documented_commands()
    assert len(commands) > 30
    for where, argv in commands:
        code = cli.main(["run", *argv, "--dry-run"])
        assert code == 0, (where, argv, capsys.readouterr().err)
    capsys.readouterr()


def test_run_picks_runs_of_a_recipe(capsys):
    import yaml

    assert cli.main(["run", "recipes/scale-latency.yaml", "--dry-run", "--run", "2", "--run", "3"]) == 0
    runs = [doc for doc in yaml.safe_load_all(capsys.readouterr().out) if doc]
    assert [(r["out_dir"], r["size"], r["reuse_latency"]) for r in runs] == [
        ("reports/scale_all", 64, True),
        ("reports/scale_160", 160, False),
    ]
    assert cli.main(["run", "recipes/scale-latency.yaml", "--dry-run", "--run", "4"]) == 2
    assert "--run 4: recipes/scale-latency.yaml has runs 1 to 3" in one_line_error(capsys)
