"""The GPU code paths, exercised without a GPU: bf16 autocast, torch.compile, fused Adam, CUDA RNG state, devices.

No test here needs CUDA. bf16 autocast runs on the CPU when asked for (``amp="bf16"``), so training,
evaluation and beam search go through the very autocast path CUDA takes; torch.compile runs on the
CPU (with the ``aot_eager`` backend, which compiles in seconds); fused Adam exists on the CPU; the
CUDA branches that only choose something (fused kernels, the RNG states of a checkpoint, ``"auto"``)
are tested through the pure functions that choose, or with torch.cuda's functions replaced.
The last test runs ``benchmarks/gpu_run.py --dry-run`` and reads what it writes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import torch

from vitdsi_utils import devices
from vitdsi_utils.ids.codec import IDCodec, make_codec
from vitdsi_utils.model import decoding
from vitdsi_utils.model.decoding import beam_search, score_all_ids
from vitdsi_utils.model.vit import DSIConfig, DSIModel
from vitdsi_utils.training import checkpoint as checkpoint_module
from vitdsi_utils.training import loop
from vitdsi_utils.training.config import TrainConfig
from vitdsi_utils.training.loop import evaluate, fit, make_optimizer
from vitdsi_utils.training.tasks import IndexingTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16
#: bf16 keeps 8 bits of mantissa: a tiny model's loss moves by a few thousandths, a beam score (a sum of
#: three log-probabilities) by about 0.01; these bounds leave room above what was measured.
BF16_LOSS_TOLERANCE = 0.02
BF16_SCORE_TOLERANCE = 0.05


def images_of(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, SIZE, SIZE, 3), generator=g, dtype=torch.uint8)


def tiny_model(codec: IDCodec, seed: int = 0, **overrides) -> DSIModel:
    torch.manual_seed(seed)
    values = dict(image_size=SIZE, patch_size=8, dim=32, mlp_dim=64, depth=1, heads=2, dropout=0.1)
    return DSIModel(DSIConfig.from_codec(codec, **{**values, **overrides}))


def quiet(**overrides) -> TrainConfig:
    return TrainConfig(**{"progress": False, "device": "cpu", "target_accuracy": None, "lr": 3e-3, **overrides})


def train(codec: IDCodec, images: torch.Tensor, **overrides) -> tuple[DSIModel, list[dict]]:
    """A tiny model trained 2 epochs on indexing ``images``; (model, train rows of its history)."""
    model = tiny_model(codec)
    history = fit(model, codec, [IndexingTask(images)], config=quiet(epochs=2, batch_size=8, **overrides))
    return model, [r for r in history if r["split"] == "train"]


def head_dtypes(model: DSIModel) -> list[torch.dtype]:
    """The dtypes of the output layer's results from now on (the logits, inside autocast or not)."""
    seen: list[torch.dtype] = []
    model.head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    return seen


def same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], rtol=0, atol=atol) for k in sa)


# ------------------------------------------------------------------------------------------
# The amp setting
# ------------------------------------------------------------------------------------------
BF16 = torch.bfloat16


@pytest.mark.parametrize(
    "device, amp, expected",
    [
        ("cpu", True, None),  # the default: the CPU stays float32, as it always did
        ("cpu", "auto", None),
        ("cpu", None, None),  # the decoding functions' default
        ("cpu", False, None),
        ("cpu", "bf16", BF16),  # asked for explicitly
        ("cuda", True, BF16),
        ("cuda", "auto", BF16),
        ("cuda", None, BF16),
        ("cuda:1", "bf16", BF16),
        ("cuda", False, None),
    ],
)
def test_amp_dtype_of_every_setting_and_device(device, amp, expected):
    assert devices.amp_dtype(torch.device(device), amp) is expected


def test_autocast_uses_the_device_type():
    """On CUDA the context is torch.autocast("cuda", bf16); built here without a GPU (it is never entered)."""
    with pytest.warns(UserWarning, match="CUDA is not available") if not torch.cuda.is_available() else _nothing():
        context = devices.autocast(torch.device("cuda"), True)
    assert isinstance(context, torch.autocast) and context.device == "cuda" and context.fast_dtype == BF16
    context = devices.autocast(torch.device("cpu"), "bf16")
    assert isinstance(context, torch.autocast) and context.device == "cpu" and context.fast_dtype == BF16
    assert not isinstance(devices.autocast(torch.device("cpu"), True), torch.autocast)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_amp_and_compile_settings_are_checked_and_old_values_load():
    from vitdsi_utils.studies.dsi import DSISpec
    from vitdsi_utils.studies.specs import SpecError, build_spec

    assert TrainConfig(amp="bf16").amp == "bf16" and TrainConfig(amp="auto").amp == "auto"
    for saved in (True, False):  # what checkpoints written before "bf16" hold
        assert TrainConfig.from_dict({**TrainConfig().to_dict(), "amp": saved}).amp is saved
    with pytest.raises(ValueError, match="amp must be true or 'auto'"):
        TrainConfig(amp="fp16")
    with pytest.raises(ValueError, match="compile must be true, false or the name"):
        TrainConfig(compile="")
    assert TrainConfig(compile="aot_eager").compile == "aot_eager"
    # runtime settings: a model trained with bf16 or compiled is reused for any other setting of them
    assert TrainConfig(amp="bf16", compile="aot_eager").recipe() == TrainConfig().recipe()
    spec = build_spec(DSISpec, {"index": {"amp": "bf16", "compile": "aot_eager"}})
    assert (spec.index.amp, spec.index.compile) == ("bf16", "aot_eager")
    with pytest.raises(SpecError, match="index.amp: must be true or 'auto'"):
        build_spec(DSISpec, {"index": {"amp": "half"}})


# ------------------------------------------------------------------------------------------
# bf16 in training, evaluation and beam search, on the CPU
# ------------------------------------------------------------------------------------------
def test_default_amp_leaves_cpu_training_bit_identical():
    """amp=True (the default) is float32 on the CPU: the same weights and history as amp=False."""
    codec, images = make_codec(16), images_of(16)
    on, rows_on = train(codec, images, amp=True)
    off, rows_off = train(codec, images, amp=False)
    assert same_weights(on, off)
    assert [r["loss"] for r in rows_on] == [r["loss"] for r in rows_off]


def test_bf16_training_on_cpu_runs_autocast_and_stays_close_to_fp32():
    codec, images = make_codec(16), images_of(16)
    model = tiny_model(codec)
    seen = head_dtypes(model)
    history = fit(model, codec, [IndexingTask(images)], config=quiet(epochs=2, batch_size=8, amp="bf16"))
    assert set(seen) == {BF16}  # every training forward pass produced bf16 logits
    bf16_rows = [r for r in history if r["split"] == "train"]
    _, fp32_rows = train(codec, images, amp=False)
    for a, b in zip(bf16_rows, fp32_rows):
        assert torch.isfinite(torch.tensor(a["loss"]))
        assert abs(a["loss"] - b["loss"]) <= BF16_LOSS_TOLERANCE, (a["loss"], b["loss"])
    # evaluation takes the same setting
    seen.clear()
    bf16 = evaluate(model, codec, [IndexingTask(images)], amp="bf16")["indexing"]
    assert set(seen) == {BF16}
    seen.clear()
    fp32 = evaluate(model, codec, [IndexingTask(images)], amp=True)["indexing"]  # CPU: float32
    assert set(seen) == {torch.float32}
    assert abs(bf16["loss"] - fp32["loss"]) <= BF16_LOSS_TOLERANCE


def test_bf16_beam_search_on_cpu_finds_the_same_ids(monkeypatch):
    codec, images = make_codec(40), images_of(6)
    model = tiny_model(codec).eval()
    seen = head_dtypes(model)
    sizes = []
    real = decoding.queries_per_batch
    monkeypatch.setattr(decoding, "queries_per_batch", lambda *a, **kw: sizes.append(a[4]) or real(*a, **kw))
    # a beam as wide as the ID set: no pruning, so bf16 rounding cannot send the search down another branch
    s16, r16 = beam_search(model, images, codec, k=10, beam_size=len(codec), amp="bf16")
    assert set(seen) == {BF16} and sizes == [True]  # bf16 logits; batches sized for 2-byte activations
    seen.clear()
    s32, r32 = beam_search(model, images, codec, k=10, beam_size=len(codec), amp=False)
    assert set(seen) == {torch.float32} and sizes == [True, False]
    assert s16.dtype == torch.float32  # scores are summed in float32 either way
    assert (s16 - s32).abs().max() <= BF16_SCORE_TOLERANCE
    # the same IDs, up to swaps between IDs whose float32 scores lie within the bf16 error
    for q in range(len(images)):
        for row, score in zip(r16[q].tolist(), s32[q].tolist()):
            if row not in r32[q].tolist():
                assert score - s32[q, -1] <= BF16_SCORE_TOLERANCE
    # the default (amp None) and amp=True leave the CPU in float32: bit-identical to amp=False
    for amp in (None, True, "auto"):
        s, r = beam_search(model, images, codec, k=10, beam_size=len(codec), amp=amp)
        assert torch.equal(s, s32) and torch.equal(r, r32)
    exact = score_all_ids(model, images, codec, amp="bf16")
    assert (exact - score_all_ids(model, images, codec)).abs().max() <= BF16_SCORE_TOLERANCE


# ------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------
def test_compile_backend_of_every_setting():
    assert devices.compile_backend(False) is None
    assert devices.compile_backend(True) == "inductor"
    assert devices.compile_backend("aot_eager") == "aot_eager"
    model = torch.nn.Linear(2, 2)
    assert devices.compile_model(model, False) is model


def test_compile_true_compiles_on_cpu_too(monkeypatch):
    """No more "CUDA only" warning: compile=True compiles with inductor wherever it trains (recorded, not run)."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    codec, images = make_codec(8), images_of(8)
    fit(tiny_model(codec), codec, [IndexingTask(images)], config=quiet(epochs=1, compile=True))
    assert calls == [{"backend": "inductor"}]


def test_compiled_training_matches_eager_on_cpu():
    """The compiled model trains the model's own weights, to what eager training gives (aot_eager: seconds)."""
    codec, images = make_codec(16), images_of(16)
    eager, eager_rows = train(codec, images)
    compiled, compiled_rows = train(codec, images, compile="aot_eager")
    assert len(compiled_rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in compiled_rows)
    for a, b in zip(compiled_rows, eager_rows):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    assert same_weights(compiled, eager, atol=1e-4)
    assert not same_weights(compiled, tiny_model(codec))  # it did train


# ------------------------------------------------------------------------------------------
# Fused Adam
# ------------------------------------------------------------------------------------------
def test_optimizer_kwargs_pick_fused_kernels_on_cuda_only():
    assert devices.optimizer_kwargs(torch.device("cuda")) == {"fused": True}
    assert devices.optimizer_kwargs("cuda:1") == {"fused": True}
    assert devices.optimizer_kwargs(torch.device("cpu")) == {}


def test_make_optimizer_asks_for_the_model_device(monkeypatch):
    asked = []
    monkeypatch.setattr(loop, "optimizer_kwargs", lambda device: asked.append(device) or {"fused": True})
    model = tiny_model(make_codec(8))
    for config in (quiet(), quiet(weight_decay=0.01)):
        optimizer = make_optimizer(model, config)
        assert optimizer.defaults["fused"] is True  # what a CUDA model gets
    assert asked == [torch.device("cpu")] * 2
    assert isinstance(optimizer, torch.optim.AdamW)
    assert not make_optimizer(model, quiet(), fused=False).defaults["fused"]


def key_bias(name: str, dim: int) -> slice | None:
    """The attention key biases inside a packed in-projection bias (q, k, v): softmax ignores them."""
    return slice(dim, 2 * dim) if name.endswith("in_proj_bias") else None


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_fused_and_plain_adam_train_the_same_weights_on_cpu(monkeypatch, weight_decay):
    """Fused Adam (CUDA's choice, run on the CPU) trains the weights plain Adam does, to float rounding.

    Except the attention key biases: their true gradient is zero (softmax is invariant to them), so
    Adam divides rounding noise by its own size and moves them by up to lr per step in a direction
    the summation order decides; they are held to that bound instead.
    """
    codec, images = make_codec(16), images_of(16)
    plain, plain_rows = train(codec, images, weight_decay=weight_decay)
    monkeypatch.setattr(loop, "optimizer_kwargs", lambda device: {"fused": True})  # the CUDA branch, on the CPU
    fused, fused_rows = train(codec, images, weight_decay=weight_decay)
    assert [r["loss"] for r in fused_rows] == pytest.approx([r["loss"] for r in plain_rows], abs=1e-6)
    lr, steps, dim = quiet().lr, 4, plain.config.dim  # 2 epochs of 2 batches
    a, b = fused.state_dict(), plain.state_dict()
    for name in a:
        difference = (a[name] - b[name]).abs()
        keys = key_bias(name, dim)
        if keys is not None:
            assert difference[keys].max() <= lr * steps, name
            difference[keys] = 0
        assert difference.max() <= 1e-6, name


# ------------------------------------------------------------------------------------------
# CUDA RNG state in checkpoints
# ------------------------------------------------------------------------------------------
def fake_cuda(monkeypatch, count: int, states: list[torch.Tensor]) -> list:
    """torch.cuda with ``count`` devices whose RNG states are ``states``; returns the list set_rng_state_all fills."""
    restored: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda new: restored.append([s.clone() for s in new]))
    return restored


CUDA_STATES = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]


def test_checkpoint_stores_and_restores_the_cuda_rng_states(monkeypatch, tmp_path):
    codec = make_codec(8)
    model = tiny_model(codec)
    optimizer = make_optimizer(model, quiet())
    generator = torch.Generator().manual_seed(5)
    restored = fake_cuda(monkeypatch, 2, CUDA_STATES)
    path = checkpoint_module.save_checkpoint(
        tmp_path / "run.ckpt", model, optimizer, model.config, quiet(), 1, [], codec, generator=generator
    )
    state = checkpoint_module.load_checkpoint(path)
    saved = state["rng"]["cuda"]
    assert len(saved) == 2 and all(torch.equal(a, b) for a, b in zip(saved, CUDA_STATES))
    checkpoint_module.restore_training(state, tiny_model(codec, seed=1), optimizer, [], torch.Generator())
    assert len(restored) == 1 and all(torch.equal(a, b) for a, b in zip(restored[0], CUDA_STATES))


@pytest.mark.parametrize("count", [0, 1, 3])
def test_cuda_rng_states_are_skipped_where_the_devices_differ(monkeypatch, count):
    """Saved on 2 GPUs, restored where there are none or another number: the CPU and run streams still are."""
    fake_cuda(monkeypatch, 2, CUDA_STATES)
    generator = torch.Generator().manual_seed(7)
    state = checkpoint_module.rng_state(generator)
    expected = torch.rand(3, generator=generator)
    restored = fake_cuda(monkeypatch, count, CUDA_STATES)
    resumed = torch.Generator()
    checkpoint_module.set_rng_state(state, resumed)
    assert restored == []
    assert torch.equal(torch.rand(3, generator=resumed), expected)


def test_no_cuda_states_saved_without_cuda(monkeypatch):
    restored = fake_cuda(monkeypatch, 0, CUDA_STATES)
    state = checkpoint_module.rng_state(None)
    assert state["cuda"] == [] and state["generator"] is None
    fake_cuda(monkeypatch, 2, CUDA_STATES)  # resumed on a GPU machine: nothing to restore there
    checkpoint_module.set_rng_state(state, None)
    assert restored == []


# ------------------------------------------------------------------------------------------
# Devices: "auto" everywhere, one resolve function
# ------------------------------------------------------------------------------------------
def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.resolve_device() == devices.resolve_device(None) == torch.device("cuda")
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device("auto") == torch.device("cpu")


def test_one_resolve_function():
    from vitdsi_utils.baselines import dense
    from vitdsi_utils.training import config

    assert config.resolve_device is devices.resolve_device  # the old import path still works
    assert not hasattr(dense, "_resolve_device")


def _configs(value):
    """Every training config (an object with a ``device`` field) inside a spec, found field by field."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if any(f.name == "device" for f in dataclasses.fields(value)):
            yield value
        for f in dataclasses.fields(value):
            yield from _configs(getattr(value, f.name))


def test_every_entry_point_defaults_to_auto():
    from vitdsi_utils.baselines.dense import DenseTrainConfig
    from vitdsi_utils.baselines.ssl import SSLConfig
    from vitdsi_utils.demo import QueryDemo
    from vitdsi_utils.retrieval import latency
    from vitdsi_utils.retrieval.searchers import DenseRetriever
    from vitdsi_utils.runs import load_trained
    from vitdsi_utils.studies import clusters, scale, scale_tables
    from vitdsi_utils.studies.recipes import STUDIES

    for config in (TrainConfig(), DenseTrainConfig(), SSLConfig()):
        assert config.device == "auto", type(config).__name__
    for name, study in STUDIES.items():
        for config in _configs(study.spec()):
            assert config.device == "auto", f"{name}: {type(config).__name__}.device is {config.device!r}"
    functions = [
        latency.dsi_latency,
        latency.dsi_latency_rows,
        latency.dense_latency,
        latency.dense_latency_rows,
        scale_tables.latency_table,
        scale._scale_study,
        clusters.study_encoders,
        DenseRetriever.from_checkpoint,
        QueryDemo.from_run_dir,
        load_trained,
    ]
    for function in functions:
        assert inspect.signature(function).parameters["device"].default == "auto", function.__qualname__


def test_auto_resolves_before_it_is_recorded(monkeypatch):
    """A latency row names the device the search ran on, never "auto"."""
    import numpy as np

    from vitdsi_utils.retrieval import latency

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    queries = np.asarray(images_of(2))
    overrides = dict(patch_size=8, dim=32, mlp_dim=64, depth=1, heads=2)
    (row,) = latency.dsi_latency_rows(20, queries, [5], model_overrides=overrides, repeats=1, batch_size=2)
    assert row["ms_per_query"] > 0
    resolved = []
    real = decoding.beam_search

    def recording(*args, **kwargs):
        resolved.append(kwargs["device"])
        return real(*args, **kwargs)

    monkeypatch.setattr(latency, "beam_search", recording)
    latency.dsi_latency_rows(20, queries, [5], model_overrides=overrides, repeats=1, batch_size=2)
    assert set(resolved) == {torch.device("cpu")}


# ------------------------------------------------------------------------------------------
# benchmarks/gpu_run.py --dry-run
# ------------------------------------------------------------------------------------------
def load_gpu_run():
    spec = importlib.util.spec_from_file_location("gpu_run", ROOT / "benchmarks" / "gpu_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_run_refuses_a_machine_without_gpu(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_gpu_run().main(["--out", str(tmp_path / "gpu")]) == 2
    assert "--dry-run" in capsys.readouterr().out and not (tmp_path / "gpu").exists()


@pytest.mark.slow
def test_gpu_run_dry_run_writes_every_table(tmp_path):
    out = tmp_path / "gpu"
    assert load_gpu_run().main(["--dry-run", "--out", str(out)]) == 0
    results = json.loads((out / "gpu_run.json").read_text())
    assert results["dry_run"] is True
    assert {"torch", "python", "torch_device"} <= results["environment"].keys()
    assert set(results["seconds"]) == {"train", "decode", "cell", "total"}
    # training: the three variants, timed, with their checks
    train_rows = results["train"]["rows"]
    assert [r["variant"] for r in train_rows] == ["fp32", "bf16", "bf16+compile"]
    assert [r["compile"] for r in train_rows] == [False, False, "aot_eager"]
    assert all(r["examples_per_s"] > 0 and r["losses_finite"] for r in train_rows)
    assert results["train"]["checks"] == {"losses_finite": True, "bf16_first_loss_close": True}
    # decoding: fp32 and bf16, every N and k
    decode = {(r["precision"], r["n"], r["k"]) for r in results["decode"]["rows"]}
    assert decode == {(p, n, k) for p in ("fp32", "bf16") for n in (64, 256) for k in (10, 100)}
    assert all(r["ms_per_query"] > 0 for r in results["decode"]["rows"])
    # the cell: both models scored, the caps said
    cell = results["cell"]
    assert (cell["profile"], cell["ids"], cell["seed"]) == ("smoke", "clustered", 0)
    assert set(cell["metrics"]) == {"DSI zero-shot", "DSI fine-tuned"}
    assert {"IA@1", "mAP@10", "P@10", "R@100"} <= cell["metrics"]["DSI zero-shot"].keys()
    assert cell["capped"] == {"index": True, "fine_tune": True}  # by --dry-run's caps, not by time
    assert cell["time_capped"] == {"index": False, "fine_tune": False}
    assert cell["phases"]["DSI zero-shot"]["epochs"] == 1
    readme = (out / "README.md").read_text()
    for heading in ("## Training throughput", "## Beam-search latency against N", "## One cell", "## Environment"):
        assert heading in readme
    assert "dry run" in readme and "indexing capped at 1 epoch (profile: 40) by request" in readme
    for header in ("| variant", "| precision", "| model", "bf16+compile"):
        assert header in readme


@pytest.fixture
def smoke_cell():
    """The dry run's cell: the smoke profile's database of digits (N = 200, clustered IDs) and a tiny model."""
    from vitdsi_utils.data.database import database_with_ids
    from vitdsi_utils.data.images import load_images

    db, assignment = database_with_ids(load_images("digits", 32, progress=False), 200, "clustered", seed=0)
    overrides = dict(patch_size=8, dim=32, mlp_dim=64, depth=1, heads=2)
    config = quiet(epochs=4, batch_size=16, target_accuracy=1.0, stop_metric="eval")
    return db, assignment.codec, overrides, config


def test_gpu_run_indexes_in_chunks_that_fit_the_time(monkeypatch, tmp_path, smoke_cell):
    """Raising the cap chunk by chunk trains the model a single run to the last cap trains; no time: one chunk."""
    from vitdsi_utils.phases import index_database

    gpu_run = load_gpu_run()
    monkeypatch.setattr(gpu_run, "FIRST_INDEX_CHUNK", 1)
    db, codec, overrides, config = smoke_cell
    zero, cut = gpu_run.index_within(db, codec, overrides, config, str(tmp_path / "chunks"), seconds=1e9)
    assert not cut and (zero.epochs, zero.epoch_cap, zero.reached_target) == (4, 4, False)  # caps 1, 2, 4
    straight = index_database(db, model_overrides=overrides, config=config, run_dir=tmp_path / "straight", codec=codec)
    assert same_weights(zero.model, straight.model)
    zero, cut = gpu_run.index_within(db, codec, overrides, config, str(tmp_path / "hurried"), seconds=0.0)
    assert cut and zero.epochs == 1


def test_gpu_run_fits_the_retrieval_epochs_to_the_time_left(smoke_cell):
    from vitdsi_utils.phases import index_database

    db, codec, overrides, config = smoke_cell
    zero = index_database(db, model_overrides=overrides, config=config, codec=codec)
    cap = load_gpu_run().retrieval_cap
    assert cap(db, zero, config, 75, seconds=1e9) == 75
    assert cap(db, zero, config, 75, seconds=0.0) == 1  # at least one epoch
    some = cap(db, zero, config, 10_000, seconds=60.0)
    assert 1 < some < 10_000 and cap(db, zero, config, 10_000, seconds=120.0) >= 2 * some
