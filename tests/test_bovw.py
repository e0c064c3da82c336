"""BoVW baseline: shapes, normalisation, search order, known answers and input errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from vitdsi_utils.bovw import (
    SIFT_DIM,
    BoVW,
    assign_words,
    extract_sift,
    power_normalise,
    rootsift,
    vlad_vectors,
    word_histograms,
)

SIZE = 64
N_PER_CLASS = 10
N_WORDS = 12


def texture(rng: np.random.Generator, kind: int, size: int = SIZE) -> np.ndarray:
    """A (size, size, 3) uint8 RGB image of texture class ``kind``, randomised so no two are equal."""
    y, x = np.mgrid[0:size, 0:size].astype(float)
    if kind == 0:  # checkerboards of random cell size and phase
        cell = rng.integers(6, 12)
        ox, oy = rng.integers(0, cell, size=2)
        base = (((x + ox) // cell + (y + oy) // cell) % 2) * 200.0
    elif kind == 1:  # sine gratings
        fx, fy = rng.uniform(2.5, 4.5, size=2)
        base = (np.sin(x / fx + rng.uniform(0, 2 * np.pi)) * np.cos(y / fy) > 0) * 220.0
    else:  # a few bright discs
        base = np.zeros((size, size))
        for cx, cy, r in zip(rng.uniform(0, size, 6), rng.uniform(0, size, 6), rng.uniform(4, 10, 6)):
            base += ((x - cx) ** 2 + (y - cy) ** 2 < r**2) * 200.0
    grey = np.clip(base + rng.integers(0, 40, size=(size, size)), 0, 255).astype(np.uint8)
    return np.stack([grey, np.roll(grey, 2, axis=1), 255 - grey], axis=-1)


def make_images(n_per_class: int = N_PER_CLASS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images (3 n, SIZE, SIZE, 3) uint8 with classes interleaved, and their labels (3 n,)."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(3), n_per_class)
    return np.stack([texture(rng, kind) for kind in labels]), labels


def flat_image(value: int = 128) -> np.ndarray:
    """A (1, SIZE, SIZE, 3) uint8 image of one grey level: no SIFT keypoints."""
    return np.full((1, SIZE, SIZE, 3), value, dtype=np.uint8)


@pytest.fixture(scope="module")
def database() -> tuple[np.ndarray, np.ndarray]:
    return make_images()


@pytest.fixture(scope="module")
def fitted(database) -> BoVW:
    images, _ = database
    return BoVW(N_WORDS, progress=False).fit(images)


# -- fitting and encoding ---------------------------------------------------------------------


def test_fit_learns_state_of_the_documented_shapes(database, fitted):
    images, _ = database
    assert fitted.vocabulary_.shape == (N_WORDS, 128) and fitted.vocabulary_.dtype == np.float32
    assert fitted.index_.shape == (len(images), N_WORDS) and fitted.index_.dtype == np.float32
    assert fitted.n_descriptors_ == sum(len(d) for d in extract_sift(images, progress=False))
    assert fitted.empty_images_.size == 0
    assert not hasattr(fitted, "idf_")


def test_transform_of_the_database_reproduces_the_index_with_unit_rows(database, fitted):
    images, _ = database
    vectors = fitted.transform(images)
    assert vectors.shape == (len(images), N_WORDS) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(vectors, fitted.index_, atol=1e-6)
    assert (vectors >= 0).all()  # plain histograms have no negative entries


def test_fit_transform_equals_fit_then_index(database):
    images, _ = database
    model = BoVW(N_WORDS, progress=False)
    np.testing.assert_array_equal(model.fit_transform(images), model.index_)


def test_same_random_state_gives_the_same_model_and_thread_count_does_not_matter(database, fitted):
    images, _ = database
    again = BoVW(N_WORDS, progress=False, n_jobs=1).fit(images)
    np.testing.assert_array_equal(again.vocabulary_, fitted.vocabulary_)
    np.testing.assert_array_equal(again.index_, fitted.index_)


def test_grayscale_batch_is_accepted(database, fitted):
    images, _ = database
    grey = images[..., 0]
    rgb = np.repeat(grey[..., None], 3, axis=-1)  # equal channels convert back to the same grey
    np.testing.assert_allclose(fitted.transform(grey), fitted.transform(rgb), atol=1e-6)


def test_descriptor_subsample_is_seeded_and_keeps_every_descriptor_in_the_histograms(database):
    images, _ = database
    models = [BoVW(N_WORDS, max_descriptors=200, progress=False).fit(images) for _ in range(2)]
    np.testing.assert_array_equal(models[0].vocabulary_, models[1].vocabulary_)
    assert models[0].n_descriptors_ > 200
    histograms = word_histograms(extract_sift(images, progress=False), models[0].vocabulary_)
    assert histograms.sum() == models[0].n_descriptors_


@pytest.mark.parametrize("option", ["rootsift", "tfidf"])
def test_options_change_the_vectors_but_not_shapes_or_norms(database, fitted, option):
    images, _ = database
    model = BoVW(N_WORDS, progress=False, **{option: True}).fit(images)
    assert model.index_.shape == fitted.index_.shape and model.index_.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(model.index_, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(model.index_, fitted.index_)
    _, ranked = model.search(images, 1)
    assert (ranked[:, 0] == np.arange(len(images))).mean() >= 0.9


def test_idf_follows_the_documented_formula(database):
    images, _ = database
    model = BoVW(N_WORDS, tfidf=True, progress=False).fit(images)
    histograms = word_histograms(extract_sift(images, progress=False), model.vocabulary_)
    df = (histograms > 0).sum(axis=0)
    np.testing.assert_allclose(model.idf_, np.log(len(images) / (1 + df)), rtol=1e-6)
    weighted = histograms * model.idf_
    np.testing.assert_allclose(model.index_, weighted / np.linalg.norm(weighted, axis=1, keepdims=True), atol=1e-6)


def test_rootsift_rows_have_unit_l2_norm():
    descriptors = np.random.default_rng(1).integers(0, 200, size=(50, 128)).astype(np.float32)
    descriptors[0] = 0  # an all-zero row must not produce NaN
    root = rootsift(descriptors)
    assert root.dtype == np.float32 and not np.isnan(root).any()
    # sqrt of an L1-normalised non-negative row has squared entries summing to 1
    np.testing.assert_allclose(np.linalg.norm(root[1:], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(root[0], 0)


# -- assignment and histograms ----------------------------------------------------------------


def test_vectorised_assignment_equals_brute_force(database):
    images, _ = database
    descriptors = np.concatenate(extract_sift(images[:4], progress=False))
    vocabulary = np.random.default_rng(2).uniform(0, 60, size=(7, 128)).astype(np.float32)
    distances = ((descriptors[:, None, :].astype(np.float64) - vocabulary[None, :, :]) ** 2).sum(axis=-1)
    expected = distances.argmin(axis=1)
    np.testing.assert_array_equal(assign_words(descriptors, vocabulary), expected)
    np.testing.assert_array_equal(assign_words(descriptors, vocabulary, chunk_size=17), expected)


def test_histograms_count_descriptors_per_word():
    vocabulary = np.eye(3, 128, dtype=np.float32) * 100
    noise = np.random.default_rng(3).normal(0, 1, size=(4, 128)).astype(np.float32)
    per_image = [vocabulary[[0, 0, 2]] + noise[:3], np.empty((0, 128), np.float32), vocabulary[[1]] + noise[3:]]
    expected = np.array([[2, 0, 1], [0, 0, 0], [0, 1, 0]], dtype=np.float32)
    np.testing.assert_array_equal(word_histograms(per_image, vocabulary), expected)


# -- search -----------------------------------------------------------------------------------


def test_search_returns_distinct_rows_by_descending_cosine(database, fitted):
    images, _ = database
    queries, _ = make_images(n_per_class=3, seed=1)
    scores, rows = fitted.search(queries, 7)
    assert scores.shape == rows.shape == (len(queries), 7)
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    assert all(len(set(row)) == 7 for row in rows.tolist())
    assert (np.diff(scores, axis=1) <= 0).all()
    expected = fitted.transform(queries) @ fitted.index_.T
    np.testing.assert_allclose(scores, np.take_along_axis(expected, rows, axis=1), atol=1e-6)
    # nothing outside the top-7 scores higher than the 7th
    assert (np.sort(expected, axis=1)[:, -8] <= scores[:, -1] + 1e-6).all()


def test_database_images_retrieve_themselves_first(database, fitted):
    images, labels = database
    scores, rows = fitted.search(images, 5)
    assert (rows[:, 0] == np.arange(len(images))).mean() >= 0.9
    np.testing.assert_allclose(scores[:, 0], 1.0, rtol=1e-5)
    # textures of a class share words: neighbours after self are mostly the same class (chance 1/3)
    assert (labels[rows[:, 1:]] == labels[:, None]).mean() > 0.6


def test_k_is_clipped_to_the_database_size(database, fitted):
    images, _ = database
    scores, rows = fitted.search(images[:2], 1000)
    assert rows.shape == scores.shape == (2, len(images))
    np.testing.assert_array_equal(np.sort(rows, axis=1), np.tile(np.arange(len(images)), (2, 1)))


def test_ties_are_broken_by_lower_database_row():
    model = BoVW(2, progress=False)
    model.vocabulary_ = np.zeros((2, 128), np.float32)
    model.index_ = np.array([[1, 0], [0, 1], [1, 0], [0.6, 0.8], [0, 0]], dtype=np.float32)
    scores, rows = model.search_vectors(np.array([[1, 0], [0, 0]], dtype=np.float32), 5)
    np.testing.assert_array_equal(rows, [[0, 2, 3, 1, 4], [0, 1, 2, 3, 4]])
    np.testing.assert_allclose(scores, [[1, 1, 0.6, 0, 0], [0, 0, 0, 0, 0]])


def test_flat_images_get_zero_vectors_a_warning_and_score_zero(database):
    images, _ = database
    with pytest.warns(UserWarning, match="1 of 31 database images have no SIFT keypoints"):
        model = BoVW(N_WORDS, progress=False).fit(np.concatenate([images, flat_image()]))
    np.testing.assert_array_equal(model.empty_images_, [len(images)])
    np.testing.assert_array_equal(model.index_[-1], 0)

    with pytest.warns(UserWarning, match="1 of 2 images have no SIFT keypoints"):
        vectors = model.transform(np.concatenate([flat_image(30), images[:1]]))
    np.testing.assert_array_equal(vectors[0], 0)

    with pytest.warns(UserWarning):
        scores, rows = model.search(flat_image(200), 5)
    np.testing.assert_array_equal(scores, 0)
    np.testing.assert_array_equal(rows, [np.arange(5)])

    # the flat database image scores 0 against a textured query, so it comes last
    scores, rows = model.search(images[:1], len(images) + 1)
    assert rows[0, -1] == len(images) and scores[0, -1] == 0


def test_no_warning_when_every_image_has_keypoints(database, fitted):
    images, _ = database
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fitted.transform(images[:3])


# -- errors -----------------------------------------------------------------------------------


def test_too_few_descriptors_for_the_vocabulary_is_explained(database):
    images, _ = database
    with pytest.raises(
        ValueError, match=r"n_words=5000 .* need at least 5000 SIFT descriptors.*Any n_words <= \d+ works"
    ):
        BoVW(5000, max_descriptors=None, progress=False).fit(images[:2])
    with pytest.raises(ValueError, match="have no SIFT keypoints at all"):
        BoVW(N_WORDS, progress=False).fit(np.concatenate([flat_image(), flat_image(9)]))


@pytest.mark.parametrize(
    "images, error",
    [
        (np.zeros((2, SIZE, SIZE, 3), dtype=np.float32), TypeError),
        (np.zeros((2, SIZE, SIZE, 4), dtype=np.uint8), ValueError),
        (np.zeros((SIZE, SIZE), dtype=np.uint8), ValueError),
        (np.zeros((SIZE, SIZE, 3), dtype=np.uint8), ValueError),
        (np.zeros((1, 2, SIZE, SIZE, 3), dtype=np.uint8), ValueError),
        (np.zeros((0, SIZE, SIZE, 3), dtype=np.uint8), ValueError),
    ],
)
def test_bad_images_are_rejected(images, error):
    with pytest.raises(error):
        BoVW(N_WORDS, progress=False).fit(images)


def test_bad_hyper_parameters_are_rejected_at_fit(database):
    images, _ = database
    for params in ({"n_words": 0}, {"n_words": 20, "max_descriptors": 10}, {"n_jobs": 0}):
        with pytest.raises(ValueError):
            BoVW(**params, progress=False).fit(images[:3])


def test_use_before_fit_raises_not_fitted(database):
    images, _ = database
    model = BoVW(N_WORDS, progress=False)
    for call in (
        lambda: model.transform(images),
        lambda: model.search(images, 1),
        lambda: model.search_vectors(np.zeros((1, N_WORDS), np.float32), 1),
    ):
        with pytest.raises(NotFittedError):
            call()


@pytest.mark.parametrize("k", [0, -3, 1.5, True])
def test_bad_k_is_rejected(fitted, k):
    with pytest.raises(ValueError, match="k must be"):
        fitted.search_vectors(fitted.index_[:1], k)


def test_query_vectors_of_the_wrong_width_are_rejected(fitted):
    with pytest.raises(ValueError, match="query_vectors"):
        fitted.search_vectors(np.zeros((1, N_WORDS + 1), np.float32), 3)


def test_scikit_learn_parameter_protocol():
    model = BoVW(7, tfidf=True, random_state=3)
    params = clone(model).get_params()
    assert params["n_words"] == 7 and params["tfidf"] is True and params["random_state"] == 3
    assert not hasattr(clone(model), "index_")
    vlad = clone(BoVW(8, encoding="vlad", intra_normalisation=True)).get_params()
    assert vlad["encoding"] == "vlad" and vlad["intra_normalisation"] is True and vlad["power_normalisation"] is None


# -- VLAD -------------------------------------------------------------------------------------


def unit(*entries: tuple[int, float]) -> np.ndarray:
    """A (128,) float32 vector with the given (index, value) entries and zeros elsewhere."""
    vector = np.zeros(SIFT_DIM, dtype=np.float32)
    for index, value in entries:
        vector[index] = value
    return vector


#: Two words: the origin and 10 e0. Image 0 has three descriptors: 4 e1 (word 0, residual 4 e1),
#: 9 e0 (word 1, residual -e0) and 10 e0 + 2 e2 (word 1, residual 2 e2). Image 1 has none.
VOCABULARY = np.stack([unit(), unit((0, 10.0))])
DESCRIPTORS = [
    np.stack([unit((1, 4.0)), unit((0, 9.0)), unit((0, 10.0), (2, 2.0))]),
    np.empty((0, SIFT_DIM), np.float32),
]


def test_vlad_sums_residuals_per_word_known_answer_without_power_normalisation():
    vectors = vlad_vectors(DESCRIPTORS, VOCABULARY, power_normalisation=False)
    assert vectors.shape == (2, 2 * SIFT_DIM) and vectors.dtype == np.float32
    # blocks [4 e1 | -e0 + 2 e2], norm sqrt(16 + 1 + 4)
    expected = np.concatenate([unit((1, 4.0)), unit((0, -1.0), (2, 2.0))]) / np.sqrt(21.0)
    np.testing.assert_allclose(vectors[0], expected, atol=1e-6)
    np.testing.assert_array_equal(vectors[1], 0)  # no descriptors: an all-zero row, no NaN


def test_vlad_power_normalisation_known_answer():
    vectors = vlad_vectors(DESCRIPTORS, VOCABULARY)  # power normalisation is on by default
    # signed square roots [2 e1 | -1 e0 + sqrt(2) e2], norm sqrt(4 + 1 + 2)
    expected = np.concatenate([unit((1, 2.0)), unit((0, -1.0), (2, np.sqrt(2.0)))]) / np.sqrt(7.0)
    np.testing.assert_allclose(vectors[0], expected, atol=1e-6)


def test_vlad_intra_normalisation_gives_every_used_word_the_same_weight():
    vectors = vlad_vectors(DESCRIPTORS, VOCABULARY, intra_normalisation=True)
    # each block of [2 e1 | -e0 + sqrt(2) e2] scaled to unit length, then the whole by 1/sqrt(2)
    expected = np.concatenate([unit((1, 1.0)), unit((0, -1.0), (2, np.sqrt(2.0))) / np.sqrt(3.0)]) / np.sqrt(2.0)
    np.testing.assert_allclose(vectors[0], expected, atol=1e-6)
    blocks = vectors[0].reshape(2, SIFT_DIM)
    np.testing.assert_allclose(np.linalg.norm(blocks, axis=1), [2**-0.5, 2**-0.5], atol=1e-6)


def test_vlad_unused_words_stay_zero_under_intra_normalisation():
    vocabulary = np.concatenate([VOCABULARY, unit((5, 100.0))[None]])  # a third word nobody is near
    vectors = vlad_vectors(DESCRIPTORS[:1], vocabulary, intra_normalisation=True)
    assert np.isfinite(vectors).all()
    np.testing.assert_array_equal(vectors[0, 2 * SIFT_DIM :], 0)


def test_power_normalisation_keeps_the_sign_and_takes_square_roots():
    values = np.array([[-4.0, 4.0, 0.0, -0.25, 9.0]])
    np.testing.assert_allclose(power_normalise(values), [[-2.0, 2.0, 0.0, -0.5, 3.0]])
    np.testing.assert_allclose(power_normalise(values, alpha=1.0), values)
    # signed square root is odd: f(-x) = -f(x)
    x = np.random.default_rng(4).normal(size=(3, 50))
    np.testing.assert_allclose(power_normalise(-x), -power_normalise(x), atol=1e-7)
    assert (np.sign(power_normalise(x)) == np.sign(x)).all()


@pytest.fixture(scope="module")
def fitted_vlad(database) -> BoVW:
    images, _ = database
    return BoVW(4, encoding="vlad", progress=False).fit(images)


def test_vlad_vectors_have_k_times_128_unit_norm_entries_with_both_signs(database, fitted_vlad):
    images, _ = database
    assert fitted_vlad.dim_ == 4 * SIFT_DIM
    assert fitted_vlad.index_.shape == (len(images), 4 * SIFT_DIM) and fitted_vlad.index_.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(fitted_vlad.index_, axis=1), 1.0, rtol=1e-5)
    assert (fitted_vlad.index_ < 0).any() and (fitted_vlad.index_ > 0).any()  # residuals point both ways
    np.testing.assert_allclose(fitted_vlad.transform(images), fitted_vlad.index_, atol=1e-6)


def test_vlad_estimator_matches_the_function_on_the_same_descriptors(database, fitted_vlad):
    images, _ = database
    descriptors = extract_sift(images[:5], progress=False)
    expected = vlad_vectors(descriptors, fitted_vlad.vocabulary_)
    np.testing.assert_allclose(fitted_vlad.index_[:5], expected, atol=1e-6)


def test_vlad_retrieves_itself_and_its_class(database, fitted_vlad):
    images, labels = database
    scores, rows = fitted_vlad.search(images, 5)
    assert (rows[:, 0] == np.arange(len(images))).mean() >= 0.9
    assert (labels[rows[:, 1:]] == labels[:, None]).mean() > 0.6


def test_vlad_flat_image_gets_a_zero_vector_and_a_warning(database, fitted_vlad):
    with pytest.warns(UserWarning, match="1 of 1 images have no SIFT keypoints"):
        vectors = fitted_vlad.transform(flat_image())
    assert vectors.shape == (1, 4 * SIFT_DIM)
    np.testing.assert_array_equal(vectors, 0)


def test_power_normalised_histograms_are_normalised_square_roots(database, fitted):
    images, _ = database
    model = BoVW(N_WORDS, power_normalisation=True, progress=False).fit(images)
    np.testing.assert_array_equal(model.vocabulary_, fitted.vocabulary_)
    root = np.sqrt(word_histograms(extract_sift(images, progress=False), model.vocabulary_))
    np.testing.assert_allclose(model.index_, root / np.linalg.norm(root, axis=1, keepdims=True), atol=1e-6)
    assert model.dim_ == N_WORDS


@pytest.mark.parametrize(
    "params, message",
    [
        ({"encoding": "fisher"}, "unknown encoding"),
        ({"encoding": "vlad", "tfidf": True}, "tfidf weights word counts"),
        ({"intra_normalisation": True}, "applies to encoding='vlad' only"),
    ],
)
def test_options_that_do_not_fit_the_encoding_are_rejected(database, params, message):
    images, _ = database
    with pytest.raises(ValueError, match=message):
        BoVW(4, progress=False, **params).fit(images[:3])


# -- the study of notebook 02 (studies.bovw.run with a notebook profile's paths) ----------------------------
NOTEBOOK_PARAMS = {
    "PROFILE": "smoke",  # no spec key: left out
    "DATASET": "digits",
    "DATASET_ROOT": None,
    "DATASET_ANNOTATIONS": None,
    "DATASET_NAME": "my-digits",
    "SIZE": 32,
    "NS": [200],
    "SEEDS": [0],
    "BOVW_WORDS": 16,
    "BOVW_VOCABULARIES": 1,
    "VLAD_WORDS": 4,
    "OUT_DIR": None,
}


def test_notebook_02s_parameters_are_the_bovw_spec():
    from vitdsi_utils.studies.bovw import BoVWSpec
    from vitdsi_utils.studies.specs import notebook_spec

    spec = notebook_spec(BoVWSpec, NOTEBOOK_PARAMS)
    assert (spec.source, spec.name, spec.size, spec.ns, spec.seeds) == ("digits", "my-digits", 32, (200,), (0,))
    assert (spec.words, spec.vocabularies, spec.vlad_words, spec.encoding) == ((16,), 1, 4, "histogram")


def test_every_parameter_of_notebook_02_is_a_profile_key_of_the_spec():
    import papermill

    from vitdsi_utils.runner.profiles import RUNNER_PARAMETERS
    from vitdsi_utils.runner.run import notebooks_dir
    from vitdsi_utils.runner.sources import read_notebook
    from vitdsi_utils.studies.bovw import BoVWSpec

    declared = set(papermill.inspect_notebook(read_notebook(notebooks_dir() / "02_bovw.py")))
    assert declared - {"PROFILE", *RUNNER_PARAMETERS} == set(BoVWSpec.PROFILE_KEYS)


@pytest.mark.parametrize("values", [{"vlad_words": 8}, {"name": "pets"}])
def test_a_recipe_setting_a_profile_only_key_is_refused(values, tmp_path):
    from vitdsi_utils.runs import StudyPaths
    from vitdsi_utils.studies import bovw
    from vitdsi_utils.studies.specs import SpecError

    spec = bovw.BoVWSpec(source="digits", size=32, ns=(200,), **values)
    with pytest.raises(SpecError, match=f"{next(iter(values))}: read by a notebook profile's study only"):
        bovw.run(spec, StudyPaths(tmp_path / "out", tmp_path / "runs"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "values, message",
    [
        ({"encoding": "vlad"}, "encoding: a notebook profile's BoVW study runs plain BoVW and VLAD"),
        ({"rootsift": True}, "rootsift: a notebook profile's BoVW study runs plain BoVW and VLAD"),
        ({"words": (16, 32)}, r"words: a notebook profile's BoVW study takes one vocabulary size, got \[16, 32\]"),
    ],
)
def test_a_profiles_study_refuses_a_recipes_variants(values, message, tmp_path):
    from vitdsi_utils.runs import StudyPaths
    from vitdsi_utils.studies import bovw
    from vitdsi_utils.studies.specs import SpecError

    spec = bovw.BoVWSpec(source="digits", size=32, ns=(200,), **values)
    with pytest.raises(SpecError, match=message):
        bovw.run(spec, StudyPaths.create("mine", tmp_path / "out", tmp_path / "runs"))
    assert not list((tmp_path / "out" / "tables").iterdir())


def test_a_profiles_study_writes_the_bovw_and_vlad_tables_and_the_figure(tmp_path):
    import pandas as pd

    from vitdsi_utils.reports.paper import TABLE1_NOTE
    from vitdsi_utils.runs import StudyPaths
    from vitdsi_utils.studies import bovw
    from vitdsi_utils.studies.specs import notebook_spec

    paths = StudyPaths.create("mine", tmp_path / "out", tmp_path / "runs")
    result = bovw.run(notebook_spec(bovw.BoVWSpec, NOTEBOOK_PARAMS), paths)
    assert sorted(p.name for p in paths.tables.iterdir()) == ["bovw.csv", "bovw.md", "vlad.csv", "vlad.md"]
    assert [p.name for p in paths.figures.iterdir()] == ["bovw_vs_n.png"]
    assert sorted(p.name for p in paths.out.iterdir()) == ["figures", "tables"]  # no manifests, no variant tables
    assert not paths.runs.exists()  # BoVW trains nothing
    table = pd.read_csv(paths.tables / "bovw.csv")
    assert set(table["model"]) == {"BoVW"} and set(table["n_words"]) == {16} and set(table["n"]) == {200}
    vlad = pd.read_csv(paths.tables / "vlad.csv")
    assert set(vlad["model"]) == {"VLAD"} and set(vlad["n_words"]) == {4}
    assert (
        (paths.tables / "bovw.md")
        .read_text()
        .startswith("BoVW, 16 visual words (one k-means vocabulary), my-digits at 32 px. " + TABLE1_NOTE)
    )
    assert (
        (paths.tables / "vlad.md")
        .read_text()
        .startswith("BoVW (16 words) and VLAD (4 words x 128, power-normalised), my-digits at 32 px. ")
    )
    assert list(result.bovw.columns) == list(table.columns) and len(result.vlad) == len(vlad)
    [verdict] = result.verdicts
    assert verdict.startswith("N=200, seed 0: VLAD mAP@10 ") and verdict.split(" -> ")[1] in {
        "better",
        "worse",
        "overlap",
    }
    [precision] = result.precision
    assert precision.startswith("N=200, seed 0: P@10 = ") and "x chance (" in precision
