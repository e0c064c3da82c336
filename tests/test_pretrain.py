"""Encoder initialisation: SSL augmentations and loss, pretraining and its checkpoints, init_encoder's sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitdsi_utils.baselines.dense import DenseConfig, DenseEncoder, DenseTrainConfig, save_dense
from vitdsi_utils.baselines.init import init_encoder, torchvision_overrides
from vitdsi_utils.baselines.ssl import (
    SSLConfig,
    SSLEncoder,
    augment_views,
    encoder_state_dict,
    info_nce,
    load_ssl,
    outside_images,
    save_ssl,
    train_ssl,
)
from vitdsi_utils.model.vit import IMAGE_MEAN, IMAGE_STD, DSIConfig, DSIModel, ViTConfig, ViTEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(image_size=32, patch_size=16, dim=32, mlp_dim=64, depth=2, heads=2, dropout=0.0)
# the settings under which torchvision's VisionTransformer and ours compute the same thing
TV_TINY = dict(TINY, pos_encoding="learned", norm_eps=1e-6)


def images(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def smooth_images(n: int = 16, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Images with large coloured blobs, so crops of one image look alike and differ from other images."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        colour = rng.integers(0, 256, (2, 3))
        phase = rng.uniform(0, 2 * np.pi, 2)
        mask = (np.sin(6 * x + phase[0]) * np.cos(5 * y + phase[1]) > 0)[..., None]
        out.append(np.where(mask, colour[0], colour[1]))
    return torch.from_numpy(np.stack(out).astype(np.uint8))


# ------------------------------------------------------------------------------------------
# Augmentations
# ------------------------------------------------------------------------------------------
def test_views_keep_shape_dtype_and_repeat_with_the_seed():
    batch = images(6)
    a = augment_views(batch, torch.Generator().manual_seed(3))
    b = augment_views(batch, torch.Generator().manual_seed(3))
    c = augment_views(batch, torch.Generator().manual_seed(4))
    assert a.shape == batch.shape and a.dtype == torch.uint8 and a.is_contiguous()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, batch)


def test_views_without_crop_or_colour_are_the_image_or_its_mirror():
    batch = images(16)
    config = SSLConfig(min_scale=1.0, max_ratio=1.0, jitter=0.0, gray_p=0.0)
    out = augment_views(batch, torch.Generator().manual_seed(0), config)
    kept = [torch.equal(view, image) for view, image in zip(out, batch)]
    mirrored = [torch.equal(view, image.flip(1)) for view, image in zip(out, batch)]
    assert all(k or m for k, m in zip(kept, mirrored))
    assert 0 < sum(mirrored) < 16  # each image flipped with probability 1/2
    assert augment_views(batch[:0], torch.Generator()).shape == (0, 32, 32, 3)


def test_grayscale_views_have_equal_channels():
    out = augment_views(images(4), torch.Generator().manual_seed(0), SSLConfig(gray_p=1.0))
    assert torch.equal(out[..., 0], out[..., 1]) and torch.equal(out[..., 1], out[..., 2])


def test_views_refuse_float_images():
    with pytest.raises(TypeError, match="uint8"):
        augment_views(images(2).float(), torch.Generator())


# ------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------
def test_info_nce_prefers_matched_views():
    torch.manual_seed(0)
    z1 = torch.nn.functional.normalize(torch.randn(32, 16), dim=1)
    z2 = torch.nn.functional.normalize(z1 + 0.1 * torch.randn(32, 16), dim=1)
    shuffled = z2[torch.randperm(32)]
    assert info_nce(z1, z2) < 0.5 * info_nce(z1, shuffled)
    # a random embedding scores about log(2B - 1)
    assert abs(info_nce(z1, shuffled, temperature=10.0).item() - np.log(63)) < 0.1
    with pytest.raises(ValueError, match="B >= 2"):
        info_nce(z1[:1], z2[:1])


def test_ssl_loss_of_an_encoder_is_lower_for_views_of_the_same_image():
    torch.manual_seed(0)
    model = SSLEncoder(ViTConfig(**TINY)).eval()
    batch = smooth_images(16)
    g = torch.Generator().manual_seed(0)
    config = SSLConfig(min_scale=0.5)
    with torch.no_grad():
        z1, z2 = model(augment_views(batch, g, config)), model(augment_views(batch, g, config))
    shuffled = z2[torch.roll(torch.arange(16), 1)]
    assert info_nce(z1, z2) < info_nce(z1, shuffled)


# ------------------------------------------------------------------------------------------
# Pretraining and its checkpoints
# ------------------------------------------------------------------------------------------
def test_pretraining_lowers_the_loss_and_resumes_exactly(tmp_path, monkeypatch):
    from vitdsi_utils.baselines.ssl import save_ssl  # noqa: F401

    data = smooth_images(24)
    config = SSLConfig(epochs=4, batch_size=12, lr=3e-3, warmup_steps=2, progress=False)
    torch.manual_seed(0)
    straight = SSLEncoder(ViTConfig(**TINY), 32, 16)
    history = train_ssl(straight, data, config=config).to_frame()
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]

    path = tmp_path / "ssl.pt"
    torch.manual_seed(0)
    first = SSLEncoder(ViTConfig(**TINY), 32, 16)
    saved = save_ssl

    def save_then_stop(*args, **kwargs):  # the run is killed right after its second checkpoint
        saved(*args, **kwargs)
        if kwargs["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("vitdsi_utils.baselines.ssl.save_ssl", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_ssl(first, data, config=config, checkpoint_path=path)
    monkeypatch.undo()
    torch.manual_seed(1)  # other initial weights: the checkpoint must replace them
    resumed = SSLEncoder(ViTConfig(**TINY), 32, 16)
    resumed_history = train_ssl(resumed, data, config=config, checkpoint_path=path).to_frame()
    assert len(resumed_history) == 4
    for key, value in straight.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[key], atol=1e-6), key

    loaded, meta = load_ssl(path)
    assert meta["epoch"] == 4 and len(meta["history"]) == 4
    assert torch.equal(loaded.state_dict()["head.0.weight"], resumed.state_dict()["head.0.weight"])
    for change in ({"temperature": 0.5}, {"epochs": 6}):
        with pytest.raises(ValueError, match=list(change)[0]):
            train_ssl(
                SSLEncoder(ViTConfig(**TINY), 32, 16),
                data,
                config=SSLConfig(**{**config.to_dict(), **change}),
                checkpoint_path=path,
            )


def test_outside_images_leave_out_every_database_image():
    from vitdsi_utils.data.database import build_database
    from vitdsi_utils.data.images import load_images

    image_set = load_images("digits", 32, progress=False)
    small, large = build_database(image_set, 100, seed=0), build_database(image_set, 200, seed=1)
    pixels, rows = outside_images(image_set, [small, large])
    used = set(small.manifest["source_row"]) | set(large.manifest["source_row"])
    assert used.isdisjoint(rows)
    assert len(rows) == len(image_set.images) - len(used)
    assert np.array_equal(pixels, image_set.images[rows])


# ------------------------------------------------------------------------------------------
# init_encoder: ssl, dense, dsi
# ------------------------------------------------------------------------------------------
def dsi(**overrides) -> DSIModel:
    return DSIModel(DSIConfig(**{**TINY, **overrides}))


def test_a_dense_checkpoint_initialises_the_dsi_encoder_exactly(tmp_path):
    torch.manual_seed(0)
    dense = DenseEncoder(DenseConfig(**TINY, pooling="cls"))
    path = save_dense(tmp_path / "dense.pt", dense, DenseTrainConfig(), [], epoch=3)
    torch.manual_seed(1)
    model = dsi()
    decoder_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("decoder.", "head."))}
    report = init_encoder(model, "dense", path)
    encoder = encoder_state_dict(model)
    assert set(encoder) == set(report.copied) and len(encoder) > 10
    for key, value in encoder_state_dict(dense).items():
        assert torch.equal(encoder[key], value), key
    for key, value in decoder_before.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert report.class_token is not None and not report.class_token_copied  # the DSI has no class token

    torch.manual_seed(2)
    other = DenseEncoder(DenseConfig(**TINY, pooling="cls"))
    assert init_encoder(other, "dense", path).class_token_copied
    assert torch.equal(other.cls_token, dense.cls_token)


def test_an_ssl_checkpoint_initialises_dense_and_dsi_models(tmp_path):
    torch.manual_seed(0)
    ssl = SSLEncoder(ViTConfig(**TINY), 32, 16)
    path = save_ssl(tmp_path / "ssl.pt", ssl, SSLConfig(), [], epoch=1)
    for model in (dsi(dropout=0.1), DenseEncoder(DenseConfig(**TINY, pooling="mean"))):
        init_encoder(model, "ssl", path)
        for key, value in encoder_state_dict(ssl).items():
            assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(ValueError, match=r"dim: 32 in .*, 48 in the model; depth: 2 in .*, 3 in the model"):
        init_encoder(dsi(depth=3, dim=48, heads=2), "ssl", path)


def test_a_dsi_checkpoint_initialises_another_dsi_encoder(tmp_path):
    from vitdsi_utils.ids.codec import make_codec
    from vitdsi_utils.training.checkpoint import save_checkpoint
    from vitdsi_utils.training.config import TrainConfig

    codec = make_codec(20)
    torch.manual_seed(0)
    source = DSIModel(DSIConfig.from_codec(codec, **TINY))
    path = save_checkpoint(tmp_path / "zero_shot.pt", source, None, source.config, TrainConfig(), 1, [], codec)
    target = dsi()
    init_encoder(target, "dsi", path)
    for key, value in encoder_state_dict(source).items():
        assert torch.equal(target.state_dict()[key], value), key


def test_the_wrong_kind_of_file_is_named(tmp_path):
    torch.manual_seed(0)
    path = save_dense(tmp_path / "dense.pt", DenseEncoder(DenseConfig(**TINY)), None, [], epoch=1)
    with pytest.raises(ValueError, match="not a self-supervised encoder checkpoint"):
        init_encoder(dsi(), "ssl", path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        init_encoder(dsi(), "ssl", tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unknown encoder source"):
        init_encoder(dsi(), "imagenet", path)


def test_new_model_takes_an_encoder_init(tmp_path):
    from vitdsi_utils.data.database import build_database
    from vitdsi_utils.data.images import load_images
    from vitdsi_utils.ids.schemes import codec_for
    from vitdsi_utils.phases import encoder_init_tag, new_model

    db = build_database(load_images("digits", 32, progress=False), 100, seed=0)
    torch.manual_seed(0)
    ssl = SSLEncoder(ViTConfig(**TINY), 32, 16)
    path = save_ssl(tmp_path / "ssl.pt", ssl, SSLConfig(), [], epoch=1)
    overrides = {k: v for k, v in TINY.items() if k != "image_size"}
    model = new_model(db, codec_for(db), encoder_init=("ssl", path), **overrides)
    assert torch.equal(
        model.state_dict()["encoder.layers.0.linear1.weight"], ssl.state_dict()["encoder.layers.0.linear1.weight"]
    )
    assert encoder_init_tag(("ssl", path)).startswith("ssl:")
    assert encoder_init_tag(None) is None


def test_a_run_folder_remembers_its_encoder_init(tmp_path):
    from vitdsi_utils.data.database import build_database
    from vitdsi_utils.data.images import load_images
    from vitdsi_utils.phases import index_database
    from vitdsi_utils.training.checkpoint import CheckpointError
    from vitdsi_utils.training.config import TrainConfig

    db = build_database(load_images("digits", 32, progress=False), 100, seed=0)
    overrides = {k: v for k, v in TINY.items() if k != "image_size"}
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(
            save_ssl(tmp_path / f"ssl{seed}.pt", SSLEncoder(ViTConfig(**TINY), 32, 16), SSLConfig(), [], epoch=1)
        )
    quick = TrainConfig(epochs=1, progress=False, stop_metric="train")
    run = tmp_path / "run"
    first = index_database(db, model_overrides=overrides, config=quick, run_dir=run, encoder_init=("ssl", paths[0]))
    again = index_database(db, model_overrides=overrides, config=quick, run_dir=run, encoder_init=("ssl", paths[0]))
    assert torch.equal(first.model.state_dict()["encoder.norm.weight"], again.model.state_dict()["encoder.norm.weight"])
    for other in (("ssl", paths[1]), None):
        with pytest.raises(CheckpointError, match="encoder_init"):
            index_database(db, model_overrides=overrides, config=quick, run_dir=run, encoder_init=other)


def test_the_cli_wants_source_and_weights_together(capsys, run_recipe):
    assert run_recipe({"study": "dsi", "source": "digits", "size": 32, "ns": [100], "encoder_init": "ssl"}) == 2
    assert "go together" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# init_encoder: torchvision
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torchvision_vit(tmp_path_factory):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    ).eval()
    with torch.no_grad():  # torchvision starts the class token at zero; make it matter
        vit.class_token.normal_()
    path = tmp_path_factory.mktemp("tv") / "vit.pth"
    torch.save(vit.state_dict(), path)
    return vit, path


def torchvision_tokens(vit, batch: torch.Tensor) -> torch.Tensor:
    """torchvision's own encoder output (B, 1 + P, D) for uint8 images, normalised as our encoder does."""
    mean, std = torch.tensor(IMAGE_MEAN)[:, None, None], torch.tensor(IMAGE_STD)[:, None, None]
    x = vit._process_input((batch.permute(0, 3, 1, 2).float() / 255 - mean) / std)
    x = torch.cat([vit.class_token.expand(len(x), -1, -1), x], dim=1)
    return vit.encoder(x)


def test_torchvision_weights_give_torchvision_outputs(torchvision_vit):
    vit, path = torchvision_vit
    batch = images(4)
    with torch.no_grad():
        expected = torchvision_tokens(vit, batch)
        dense = DenseEncoder(DenseConfig(**TV_TINY, pooling="cls")).eval()
        report = init_encoder(dense, "torchvision", path)
        assert report.class_token_copied
        got = dense.encode(batch, prefix=dense.cls_token)
        assert torch.allclose(got, expected, atol=1e-5)
        assert torch.allclose(dense(batch), torch.nn.functional.normalize(expected[:, 0], dim=-1), atol=1e-5)

        model = dsi(pos_encoding="learned", norm_eps=1e-6).eval()
        report = init_encoder(model, "torchvision", path)
        assert torch.allclose(model.encode(batch, prefix=report.class_token), expected, atol=1e-5)
        encoder = ViTEncoder(ViTConfig(**TV_TINY)).eval()
        init_encoder(encoder, "torchvision", path)
        assert torch.allclose(encoder.encode(batch, prefix=report.class_token), expected, atol=1e-5)
    found = torchvision_overrides(path)  # heads are not in a state dict: guessed as dim // 64, so not compared
    assert {k: v for k, v in found.items() if k in TV_TINY and k != "heads"} == {
        k: v for k, v in TV_TINY.items() if k not in ("dropout", "heads")
    }


def test_torchvision_mismatches_are_each_named(torchvision_vit):
    _, path = torchvision_vit
    model = dsi(image_size=64, dim=64, heads=2, mlp_dim=64)  # sinusoidal positions, eps 1e-5
    with pytest.raises(ValueError) as error:
        init_encoder(model, "torchvision", path)
    message = str(error.value)
    for needle in (
        "dim=64 but the weights have width (hidden_dim) 32",
        "image_size=64 gives 16 patches",
        "(4 patches)",
        "pos_encoding='sinusoidal'",
        "norm_eps=1e-05",
        "model_overrides=",
    ):
        assert needle in message, needle
    with pytest.raises(ValueError, match="patch_size=8 but the weights have patch size"):
        init_encoder(dsi(patch_size=8, pos_encoding="learned", norm_eps=1e-6), "torchvision", path)


def test_torchvision_files_that_cannot_be_used(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        init_encoder(dsi(**TV_TINY), "torchvision", tmp_path / "nothing.pth")
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ValueError, match="not a state dict"):
        init_encoder(dsi(**TV_TINY), "torchvision", listed)
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(1)}, other)
    with pytest.raises(
        ValueError, match=r"not a torchvision VisionTransformer state dict: it lacks \['conv_proj.weight'"
    ):
        init_encoder(dsi(**TV_TINY), "torchvision", other)
    module = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), module)  # a pickled module, not a state dict: refused unread
    with pytest.raises(ValueError, match="loads safely"):
        init_encoder(dsi(**TV_TINY), "torchvision", module)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"would have to download them from https://.*vit_b_16"):
        init_encoder(dsi(**TV_TINY), "torchvision", "ViT_B_16_Weights.IMAGENET1K_V1")
    with pytest.raises(FileNotFoundError, match="would have to download"):
        init_encoder(dsi(**TV_TINY), "torchvision", "vit_b_16")


# ------------------------------------------------------------------------------------------
# The study
# ------------------------------------------------------------------------------------------
def test_pretrain_study_writes_its_report(tmp_path):
    from vitdsi_utils.studies.pretrain import pretrain_study
    from vitdsi_utils.training.config import TrainConfig

    quick = TrainConfig(epochs=1, progress=False, stop_metric="train")
    out = pretrain_study(
        "digits",
        32,
        100,
        0,
        "clustered",
        exclude_ns=(100, 200),
        model_overrides={k: v for k, v in TINY.items() if k != "image_size"},
        ssl_config=SSLConfig(epochs=1, batch_size=64, progress=False),
        index_config=quick,
        retrieval_config=quick,
        train_scratch=True,
        max_images=300,
        runs_dir=tmp_path / "runs",
        out_dir=tmp_path / "out",
        progress=False,
    )
    assert set(out["results"]["init"]) == {"ssl", "scratch"}
    assert out["probes"]["ssl_images"].iloc[0] == 300  # a subset of the digits outside both databases
    assert "over 300 images that no database of the study uses" in out["markdown"]
    assert list(out["probes"]["encoder"]) == ["random init", "SSL pretrained"]
    assert out["probes"][["knn_acc", "linear_acc", "map@10"]].stack().between(0, 1).all()
    paired = out["paired"]
    assert np.allclose(paired["diff"], paired["a"] - paired["b"])
    results = out["results"]
    for (model, metric), row in paired.set_index(["model", "metric"]).iterrows():
        ssl = results[(results["model"] == model) & (results["init"] == "ssl") & (results["metric"] == metric)]
        assert ssl["value"].iloc[0] == pytest.approx(row["a"])
    for name in (
        "pretrain_digits_32px.md",
        "paired_digits_32px.csv",
        "probes_digits_32px.csv",
        "ssl_history_digits_32px.csv",
        "pretrain_digits_32px.png",
    ):
        assert (tmp_path / "out" / name).is_file(), name
    assert "Paired differences" in (tmp_path / "out" / "pretrain_digits_32px.md").read_text()
    # other pretraining settings get their own encoder and DSI folders instead of a refused checkpoint
    pretrain_study(
        "digits",
        32,
        100,
        0,
        "clustered",
        exclude_ns=(100, 200),
        model_overrides={k: v for k, v in TINY.items() if k != "image_size"},
        ssl_config=SSLConfig(epochs=2, batch_size=64, progress=False),
        index_config=quick,
        retrieval_config=quick,
        max_images=300,
        runs_dir=tmp_path / "runs",
        progress=False,
    )
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert "ssl-digits-32px-N100-seed0-e1-b64-i300" in runs and "ssl-digits-32px-N100-seed0-e2-b64-i300" in runs
    assert sum(name.endswith("-init-ssl-e2-b64-i300") for name in runs) == 1


def test_pretrain_study_refuses_a_subset_too_small_for_info_nce():
    from vitdsi_utils.studies.pretrain import pretrain_study

    with pytest.raises(ValueError, match="max_images must be None or an integer >= 2"):
        pretrain_study("digits", 32, 100, 0, max_images=1, progress=False)


def test_paired_comparison_of_a_model_with_itself_is_zero():
    from vitdsi_utils.data.database import build_database
    from vitdsi_utils.data.images import load_images
    from vitdsi_utils.ids.schemes import codec_for
    from vitdsi_utils.studies.pretrain import paired_comparison

    db = build_database(load_images("digits", 32, progress=False), 100, seed=0)
    codec = codec_for(db)
    torch.manual_seed(0)
    model = DSIModel(DSIConfig.from_codec(codec, **TINY)).eval()
    paired = paired_comparison(model, model, codec, db)
    assert (paired[["diff", "ci_low", "ci_high"]] == 0).all().all()
    assert list(paired["metric"]) == ["IA@1", "mAP@10", "P@10"]


def test_pretrain_study_adds_a_dsi_with_semantic_ids_from_the_ssl_encoder(tmp_path):
    from vitdsi_utils.ids.schemes import hierarchical_kmeans_codes
    from vitdsi_utils.studies.pretrain import PretrainSpec, comparison_frame, pretrain_study
    from vitdsi_utils.studies.specs import build_spec
    from vitdsi_utils.training.checkpoint import load_model
    from vitdsi_utils.training.config import TrainConfig

    quick = TrainConfig(epochs=1, progress=False, stop_metric="train")
    out = pretrain_study(
        "digits",
        32,
        100,
        0,
        "clustered",
        exclude_ns=(100,),
        model_overrides={k: v for k, v in TINY.items() if k != "image_size"},
        ssl_config=SSLConfig(epochs=1, batch_size=64, progress=False),
        index_config=quick,
        retrieval_config=quick,
        max_images=200,
        semantic_ids={"k": 3, "c": 4},
        runs_dir=tmp_path / "runs",
        out_dir=tmp_path / "out",
        progress=False,
    )
    results = out["results"]
    assert set(zip(results["init"], results["ids"])) == {("ssl", "clustered"), ("ssl", "semantic")}
    table = comparison_frame(results)
    assert len(table) == 4 and set(table["ids"]) == {"clustered", "semantic"}  # zero-shot and fine-tuned of each
    facts = out["id_facts"]
    assert list(facts["embeddings"]) == ["random init", "SSL pretrained"]
    assert list(facts["tag"]) == ["semantic-random-encoder-k3-c4", "semantic-ssl-k3-c4"]
    assert facts["sibling_agreement"].between(0, 1).all() and (facts["n_ids"] == 25).all()
    # the DSI's IDs are the k-means codes of the SSL encoder's embeddings of the indexed images, in row order
    folder = next(p for p in (tmp_path / "runs").iterdir() if "semantic-ssl-k3-c4" in p.name)
    assert folder.name.endswith("-init-ssl-e1-b64-i200")
    _, codec, _ = load_model(folder / "zero_shot.pt")
    from vitdsi_utils.baselines.ssl import embed_images, load_ssl
    from vitdsi_utils.data.database import build_database
    from vitdsi_utils.data.images import load_images

    db = build_database(load_images("digits", 32, progress=False), 100, id_scheme="clustered", seed=0)
    ssl_file = next((tmp_path / "runs").glob("ssl-*/ssl.pt"))
    encoder, _ = load_ssl(ssl_file)
    expected = hierarchical_kmeans_codes(embed_images(encoder, db.split("index")[0]).double().numpy(), k=3, c=4, seed=0)
    assert [tuple(c) for c in codec.codes] == [tuple(c) for c in expected]
    assert (tmp_path / "out" / "ids_digits_32px.csv").is_file()
    assert "Semantic IDs from the encoder's embeddings" in out["markdown"]
    spec = build_spec(PretrainSpec, {"semantic_ids": True, "semantic_k": 5})
    assert (spec.semantic_ids, spec.semantic_k, spec.semantic_c) == (True, 5, 10)


# ------------------------------------------------------------------------------------------
# The study of a notebook profile (notebook 13)
# ------------------------------------------------------------------------------------------
def tiny_pretrain_spec(**values):
    from vitdsi_utils.studies.pretrain import PretrainSpec
    from vitdsi_utils.studies.specs import dsi_model
    from vitdsi_utils.training.config import TrainConfig

    defaults = dict(
        source="digits",
        size=32,
        n=100,
        exclude_ns=(100,),
        ssl=SSLConfig(epochs=1, batch_size=64),
        ssl_images=200,
        model=dsi_model(dim=16, mlp_dim=32, depth=1, heads=2),
        index=TrainConfig(epochs=1, lr=2e-3, target_accuracy=0.99),
        fine_tune=TrainConfig(epochs=1, lr=2e-3),
        max_pairs_per_query=2,
    )
    return PretrainSpec(**{**defaults, **values})


def test_notebook_13s_parameters_become_the_settings_it_trained_with():
    from vitdsi_utils.runner.profiles import load_profile
    from vitdsi_utils.studies.pretrain import PretrainSpec
    from vitdsi_utils.studies.specs import notebook_spec
    from vitdsi_utils.training.config import TrainConfig

    spec = notebook_spec(PretrainSpec, {**load_profile("smoke"), "SEEDS": [3, 4], "OUT_DIR": None})
    assert notebook_spec(PretrainSpec, {"DATASET_NAME": "my-digits"}).name == "my-digits"
    assert (spec.name, spec.source, spec.size, spec.n, spec.seed, spec.scheme, spec.exclude_ns) == (
        None,
        "digits",
        32,
        200,
        3,
        "clustered",
        (200,),
    )
    assert (spec.ssl_images, spec.semantic_ids, spec.semantic_k, spec.semantic_c) == (300, True, 5, 5)
    # the settings notebook 13 built by hand before it called pretrain.run (the profile route turns progress off)
    assert spec.ssl == SSLConfig(epochs=1, batch_size=64, seed=3)
    assert spec.index == TrainConfig(lr=0.002, batch_size=32, epochs=40, target_accuracy=0.99, warmup_steps=0, seed=3)
    assert spec.fine_tune == TrainConfig(lr=0.002, batch_size=32, epochs=3, seed=3)
    assert spec.model.overrides() == dict(
        patch_size=16, dim=32, mlp_dim=64, depth=1, heads=2, dropout=0.1, pos_encoding="sinusoidal"
    )
    assert (spec.max_pairs_per_query, spec.scratch, spec.baseline) == (4, False, None)


def test_a_profiles_pretraining_study_writes_notebook_13s_files(tmp_path):
    from vitdsi_utils.runs import StudyPaths
    from vitdsi_utils.studies import pretrain
    from vitdsi_utils.studies.specs import SpecError

    paths = StudyPaths.create("mine", tmp_path / "out", tmp_path / "runs")
    spec = tiny_pretrain_spec(name="my-digits", semantic_ids=True, semantic_k=3, semantic_c=4)
    result = pretrain.run(spec, paths)
    names = ["pretrain", "pretrain_paired", "pretrain_semantic_ids", "pretrain_probes"]
    for name in [f"{n}.{ext}" for n in names for ext in ("csv", "md")] + [
        "pretrain_ssl_history.csv",
        "pretrain_histories.csv",
    ]:
        assert (paths.tables / name).is_file(), name
    assert (paths.figures / "pretrain.png").stat().st_size > 1000
    assert not list(paths.out.glob("*.*"))  # nothing under a recipe's names
    assert (paths.tables / "pretrain.md").read_text() == result.markdown + "\n"
    assert set(result.tables["pretrain"]["init"]) == {"ssl", "scratch"}  # a profile's study always has scratch
    assert set(result.tables) == {n.removesuffix(".csv") for n in names} | {
        "pretrain_ssl_history",
        "pretrain_histories",
    }
    summary, *verdicts = result.lines
    assert summary.startswith("indexing: from the pretrained encoder (clustered IDs): ") and "from scratch" in summary
    assert len(verdicts) == 6  # 2 models x 3 metrics
    assert verdicts[0].startswith("DSI zero-shot, IA@1: pretrained minus scratch ")
    # the scratch DSI lives in the database's own run folder, named as notebook 03/04 name it (DATASET_NAME)
    assert (paths.runs / "my-digits-32px-N100-clustered-seed0" / "fine_tuned.pt").is_file()
    assert sum(p.name.startswith("ssl-my-digits-32px-N100") for p in paths.runs.iterdir()) == 1

    again = StudyPaths.create("mine", tmp_path / "again", tmp_path / "runs")
    plain = pretrain.run(tiny_pretrain_spec(name="my-digits"), again)  # every model loaded from the run folders
    assert "pretrain_semantic_ids" not in plain.tables and not (again.tables / "pretrain_semantic_ids.csv").exists()
    assert plain.tables["pretrain_paired"].equals(result.tables["pretrain_paired"])

    with pytest.raises(SpecError, match="name: read by a notebook profile's study only, not by a recipe"):
        pretrain.run(tiny_pretrain_spec(name="my-digits"), StudyPaths(tmp_path / "recipe", tmp_path / "runs"))
    assert not (tmp_path / "recipe").exists()


def test_a_recipes_pretraining_study_keeps_its_own_files_and_summary(tmp_path, run_recipe, capsys):
    recipe = {
        "study": "pretrain",
        "source": "digits",
        "size": 32,
        "n": 100,
        "exclude_ns": [100],
        "ssl": {"epochs": 1, "batch_size": 64, "progress": False},
        "ssl_images": 200,
        "model": {"dim": 16, "mlp_dim": 32, "depth": 1, "heads": 2},
        "index": {"epochs": 1, "progress": False},
        "fine_tune": {"epochs": 1, "progress": False},
        "scratch": True,
        "out_dir": str(tmp_path / "out"),
        "runs_dir": str(tmp_path / "runs"),
    }
    assert run_recipe(recipe) == 0
    printed = capsys.readouterr().out
    assert "indexing: from the pretrained encoder" in printed and "knn_acc" in printed  # console_summary
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == [
        f"{kind}_digits_32px.{ext}"
        for kind, ext in [
            ("histories", "csv"),
            ("paired", "csv"),
            ("paired", "md"),
            ("pretrain", "csv"),
            ("pretrain", "md"),
            ("pretrain", "png"),
            ("probes", "csv"),
            ("probes", "md"),
            ("ssl_history", "csv"),
        ]
    ]  # no tables/ or figures/ of a profile's report
