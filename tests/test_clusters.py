"""Embedding clusters: known answers on synthetic blobs, the embed helper on tiny encoders, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs

from vitdsi_utils.baselines.dense import DenseConfig, DenseEncoder
from vitdsi_utils.clusters import (
    available_poolings,
    cluster_scores,
    cluster_sizes,
    elbow_k,
    embed,
    kmeans,
    purity,
    subset_scores,
    sweep,
)
from vitdsi_utils.model.vit import DSIConfig, DSIModel
from vitdsi_utils.studies.clusters import (
    cluster_gallery,
    cluster_study,
    clusters_markdown,
    metric_curves,
    size_histograms,
    summary,
    unseen_scores,
)

N_BLOBS = 4


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    """120 points in 8-d around 4 centres 50 apart, spread 0.5: clusters any method must find."""
    centres = np.eye(N_BLOBS, 8) * 50.0
    x, y = make_blobs(n_samples=120, centers=centres, cluster_std=0.5, random_state=0)
    return x, y


# -- known answers on blobs -------------------------------------------------------------------


def test_well_separated_blobs_score_perfectly_at_the_true_k(blobs):
    x, y = blobs
    clusters, centres, inertia = kmeans(x, N_BLOBS)
    assert clusters.shape == (120,) and centres.shape == (N_BLOBS, 8)
    scores = cluster_scores(x, clusters, y, inertia=inertia)
    assert scores["silhouette"] > 0.95
    assert scores["davies_bouldin"] < 0.1
    assert scores["purity"] == 1.0 and scores["nmi"] == pytest.approx(1.0)
    assert scores["inertia_ratio"] < 0.01
    # without the inertia it is recomputed from the cluster means: the same number
    assert cluster_scores(x, clusters, y)["inertia"] == pytest.approx(inertia, rel=1e-9)


def test_sweep_finds_the_true_k_by_silhouette_davies_bouldin_and_elbow(blobs):
    x, y = blobs
    table, labels = sweep(x, [2, 3, 4, 5, 6, 8], y)
    assert table["k"].tolist() == [2, 3, 4, 5, 6, 8] and set(labels) == set(table["k"])
    at = table.set_index("k")
    assert at["silhouette"].idxmax() == N_BLOBS
    assert at["davies_bouldin"].idxmin() == N_BLOBS
    assert elbow_k(table["k"], table["inertia"]) == N_BLOBS
    assert (np.diff(at["inertia"]) <= 1e-9).all()  # more clusters never fit worse here
    # purity reaches 1 at the true k and stays there; NMI is highest at the true k
    assert (at.loc[at.index >= N_BLOBS, "purity"] == 1.0).all() and at["nmi"].idxmax() == N_BLOBS


def test_cluster_sizes_sum_to_n_and_count_empty_labels():
    clusters = np.array([0, 2, 2, 2, 4])
    np.testing.assert_array_equal(cluster_sizes(clusters), [1, 0, 3, 0, 1])
    np.testing.assert_array_equal(cluster_sizes(clusters, k=6), [1, 0, 3, 0, 1, 0])
    x, _ = make_blobs(n_samples=97, centers=5, random_state=1)
    labels, _, _ = kmeans(x, 7)
    assert cluster_sizes(labels, 7).sum() == 97


def test_purity_known_answers():
    assert purity([0, 0, 1, 1, 1], [0, 0, 0, 1, 1]) == pytest.approx(0.8)  # clusters {0, 0, 1} and {1, 1}
    assert purity([0, 1, 2, 3], [0, 0, 0, 0]) == pytest.approx(0.25)  # one cluster: the largest class
    assert purity([5, 5, 7], [2, 9, 9]) == pytest.approx(2 / 3)  # label values are names, not positions


def test_subset_scores_count_only_the_masked_images():
    classes = np.array([0, 0, 1, 1, 2, 2])
    clusters = np.array([0, 0, 1, 1, 1, 0])
    all_images = subset_scores(clusters, classes, np.ones(6, bool))
    assert all_images["n"] == 6 and all_images["purity"] == pytest.approx(4 / 6)
    first_four = subset_scores(clusters, classes, [1, 1, 1, 1, 0, 0])  # clusters and classes coincide there
    assert first_four == {"n": 4, "purity": 1.0, "nmi": pytest.approx(1.0), "ami": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="selects no image"):
        subset_scores(clusters, classes, np.zeros(6, bool))
    with pytest.raises(ValueError, match="same shape"):
        subset_scores(clusters, classes, [True])


def test_unseen_scores_are_those_of_the_reference_k_on_the_masked_images():
    classes = np.array([0, 0, 1, 1, 2, 2])
    labels = {
        ("A", "mean", 3): np.array([0, 0, 1, 1, 1, 0]),
        ("A", "mean", 2): np.array([0, 0, 0, 1, 1, 1]),  # another k: left out
        ("B", "-", 3): np.array([0, 1, 2, 0, 1, 2]),
    }
    table = unseen_scores(labels, classes, np.array([1, 1, 1, 1, 0, 0], bool), 3)
    assert list(zip(table["encoder"], table["pooling"])) == [("A", "mean"), ("B", "-")]
    a, b = table.iloc[0], table.iloc[1]
    assert (a["k"], a["n_unseen"], a["purity"], a["purity_unseen"]) == (3, 4, pytest.approx(4 / 6), 1.0)
    assert a["nmi_unseen"] == pytest.approx(1.0) and b["nmi"] < a["nmi"]
    nobody = unseen_scores(labels, classes, np.zeros(6, bool), 3)
    assert (nobody["n_unseen"] == 0).all() and nobody["nmi_unseen"].isna().all()


def test_elbow_known_answer_and_degenerate_curves():
    assert elbow_k([1, 2, 3, 4, 5, 6], [100, 40, 10, 8, 6, 5]) == 3
    assert elbow_k([6, 1, 3, 2, 5, 4], [5, 100, 10, 40, 6, 8]) == 3  # order of the points does not matter
    assert elbow_k([2, 3, 4], [1.0, 1.0, 1.0]) == 2  # a flat curve has no elbow: the smallest k
    with pytest.raises(ValueError, match="at least three"):
        elbow_k([2, 3], [5.0, 1.0])


def test_cluster_study_labels_rows_and_summary_picks_the_true_k(blobs):
    x, y = blobs
    rng = np.random.default_rng(0)
    embeddings = {("blobs", "-"): x, ("noise", "-"): rng.normal(size=x.shape)}
    table, labels = cluster_study(embeddings, y, [2, 4, 6], progress=False)
    assert len(table) == 6 and list(table.columns[:4]) == ["encoder", "pooling", "dim", "k"]
    assert ("noise", "-", 6) in labels
    wide = summary(table, k_reference=4).set_index("encoder")
    assert wide.at["blobs", "best_silhouette_k"] == 4 and wide.at["blobs", "elbow_k"] == 4
    assert wide.at["blobs", "nmi@k4"] == pytest.approx(1.0) and wide.at["noise", "nmi@k4"] < 0.2
    at_k4 = table[table["k"] == 4].set_index("encoder")
    assert at_k4.at["blobs", "ami"] == pytest.approx(1.0) and abs(at_k4.at["noise", "ami"]) < 0.05  # chance-corrected
    markdown = clusters_markdown(table, 4, note="blobs")
    assert markdown.startswith("blobs") and "best_silhouette_k" in markdown


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 120, 500, 2.5, True])
def test_impossible_k_is_a_clear_error(blobs, k):
    x, _ = blobs
    with pytest.raises(ValueError, match="k must"):
        kmeans(x, k)


def test_more_clusters_than_distinct_points_is_refused():
    x = np.repeat(np.eye(3), 10, axis=0)  # 30 rows, 3 distinct
    with pytest.raises(ValueError, match="only 3 distinct embeddings"):
        kmeans(x, 5)


def test_bad_embeddings_and_empty_ks_are_refused(blobs):
    x, y = blobs
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        kmeans(bad, 3)
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        kmeans(x[:, 0], 3)
    with pytest.raises(ValueError, match="ks is empty"):
        sweep(x, [], y)
    with pytest.raises(ValueError, match="k must lie"):
        sweep(x, [2, 200], y)
    with pytest.raises(ValueError, match="same length"):
        purity([0, 1], [0])


# -- embeddings of the study's encoders -------------------------------------------------------

TINY = dict(image_size=32, patch_size=8, dim=16, mlp_dim=32, depth=1, heads=2, dropout=0.1)


def images(n: int = 10) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def dsi() -> DSIModel:
    torch.manual_seed(0)
    return DSIModel(DSIConfig(**TINY))


@pytest.fixture(scope="module")
def dense_cls() -> DenseEncoder:
    torch.manual_seed(0)
    return DenseEncoder(DenseConfig(**TINY, pooling="cls"))


def test_embed_shapes_per_pooling(dsi, dense_cls):
    batch = images()
    assert available_poolings(dsi) == ("mean", "concat")
    assert available_poolings(dense_cls) == ("cls", "mean", "concat")
    assert embed(dsi, batch, pooling="mean").shape == (10, 16)
    assert embed(dsi, batch, pooling="concat").shape == (10, 16 * 16)  # 16 patches of width 16
    cls = embed(dense_cls, batch, pooling="cls")
    assert cls.shape == (10, 16) and cls.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(cls, axis=1), 1.0, rtol=1e-5)


def test_embed_matches_the_models_own_pooled_outputs(dsi, dense_cls):
    batch = images()
    dsi.eval()
    with torch.no_grad():
        own = dsi.embed(torch.from_numpy(batch)).numpy()  # DSIModel.embed: mean of its tokens
    np.testing.assert_allclose(embed(dsi, batch, normalise=False), own, atol=1e-5)
    # the dense encoder's embedding is its normalised class token
    np.testing.assert_allclose(embed(dense_cls, batch, pooling="cls"), dense_cls.embed(batch).numpy(), atol=1e-5)
    # 'mean' averages the patch tokens and leaves the class token out
    mean = embed(dense_cls, batch, pooling="mean", normalise=False)
    dense_cls.eval()
    with torch.no_grad():
        tokens = dense_cls.encode(torch.from_numpy(batch), prefix=dense_cls.cls_token)
    np.testing.assert_allclose(mean, tokens[:, 1:].mean(dim=1).numpy(), atol=1e-5)


def test_embed_is_deterministic_batch_independent_and_restores_the_mode(dsi):
    batch = images(9)
    dsi.train()
    first = embed(dsi, batch, batch_size=4)  # eval mode inside: dropout off, so runs agree
    np.testing.assert_allclose(first, embed(dsi, batch, batch_size=256), atol=1e-5)
    assert dsi.training  # put back as it was


def test_embed_refuses_what_it_cannot_do(dsi):
    with pytest.raises(ValueError, match="no class token"):
        embed(dsi, images(), pooling="cls")
    with pytest.raises(ValueError, match="unknown pooling"):
        embed(dsi, images(), pooling="max")
    with pytest.raises(TypeError, match="uint8"):
        embed(dsi, images().astype(np.float32))
    with pytest.raises(ValueError, match="batch_size"):
        embed(dsi, images(), batch_size=0)


# -- figures ----------------------------------------------------------------------------------


def test_figures_are_built(blobs):
    x, y = blobs
    table, labels = cluster_study({("a", "mean"): x, ("b", "cls"): x[:, ::-1].copy()}, y, [2, 3, 4, 5], progress=False)
    fig = metric_curves(table, title="blobs")
    assert len(fig.axes) == 5
    fig = size_histograms(
        {"a · mean": cluster_sizes(labels[("a", "mean", 4)]), "b · cls": cluster_sizes(labels[("b", "cls", 5)])}
    )
    assert len([ax for ax in fig.axes if ax.axison]) == 2
    thumbs = np.random.default_rng(0).integers(0, 256, size=(len(x), 16, 16, 3), dtype=np.uint8)
    fig = cluster_gallery(thumbs, labels[("a", "mean", 4)], y, ["w", "x", "y", "z"], n_clusters=3, per_cluster=5)
    assert len(fig.axes) == 15
    with pytest.raises(ValueError, match="must align"):
        cluster_gallery(thumbs[:5], labels[("a", "mean", 4)], y, ["w", "x", "y", "z"])
