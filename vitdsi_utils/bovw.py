"""Bag-of-Visual-Words baseline: grayscale SIFT, a k-means vocabulary, cosine search over histograms.

This is the classical baseline of section 3.1 of "Vision Transformer Memory as a Differentiable
Search Index for Image Retrieval": SIFT descriptors are extracted from the grayscale indexed
(database) images, k-means with K = 200 clusters learns the visual words on those descriptors,
every image becomes the histogram of the words its descriptors fall into, and a query is answered
with the database images of highest cosine similarity.

Refinements that the paper does not use are available (all off by default): RootSIFT
descriptors (Arandjelović & Zisserman, CVPR 2012), tf-idf weighting of the histograms, and a
second encoding of the same descriptors and words, VLAD (Jégou et al., CVPR 2010): per word, the
sum of the residuals ``x - c`` of the descriptors x assigned to the word's centre c, concatenated
into one (n_words * 128) vector, then power-normalised (signed square root; Jégou et al., TPAMI
2012), optionally intra-normalised per word (Arandjelović & Zisserman, CVPR 2013) and
L2-normalised. VLAD keeps *where* in descriptor space the descriptors fall, not only how many fall
in each cell, so it is used with far fewer words (16-64) than a histogram (hundreds to millions).
"""

from __future__ import annotations

import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from numbers import Integral

import cv2
import numpy as np
from sklearn.base import BaseEstimator
from sklearn.cluster import KMeans
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

SIFT_DIM = 128  #: length of a SIFT descriptor


#: How an image's descriptors become one vector: a histogram of word counts (the paper's BoVW)
#: or VLAD, the per-word sums of residuals to the word's centre.
ENCODINGS = ("histogram", "vlad")


# Rows of descriptors scored against the vocabulary at once: 32768 x 200 float32 distances
# are 26 MB, small enough to stay cheap and large enough for an efficient matrix product.
_ASSIGN_CHUNK = 32_768


# Queries scored against the database at once, so that (queries x database) stays bounded.
_SEARCH_CHUNK = 1_024


def _check_images(images: np.ndarray, name: str = "images") -> np.ndarray:
    """Return ``images`` as an array (n, H, W[, 3]) uint8, or raise a clear error."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8 (0..255), got dtype {images.dtype}")
    if images.ndim == 4 and images.shape[-1] != 3:
        raise ValueError(f"{name} must be (n, H, W, 3) RGB or (n, H, W) grayscale, got shape {images.shape}")
    if images.ndim not in (3, 4):
        raise ValueError(
            f"{name} must be a batch (n, H, W, 3) RGB or (n, H, W) grayscale, got shape {images.shape}"
            + ("; wrap a single image as image[None]" if images.ndim == 2 else "")
        )
    if images.ndim == 3 and images.shape[-1] == 3:
        # Read literally this is a batch of 3-pixel-wide grayscale images; far more likely it is
        # one RGB image that lost its batch axis, so refuse to guess.
        raise ValueError(f"{name} of shape {images.shape} looks like a single RGB image; pass image[None]")
    return images


def _check_k(k: object) -> int:
    """Return ``k`` as an int >= 1."""
    if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def _n_workers(n_jobs: int | None) -> int:
    """Threads to use: None or -1 mean one per CPU core."""
    if n_jobs is None or n_jobs == -1:
        return os.cpu_count() or 1
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, Integral) or n_jobs < 1:
        raise ValueError(f"n_jobs must be None, -1 or an integer >= 1, got {n_jobs!r}")
    return int(n_jobs)


def rootsift(descriptors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Return RootSIFT descriptors (n, 128) float32: each row L1-normalised, then square-rooted.

    Euclidean distance between RootSIFT vectors equals the Hellinger kernel distance between the
    original SIFT histograms, which matches them better than plain Euclidean distance does.
    """
    descriptors = np.asarray(descriptors, dtype=np.float32)
    # SIFT entries are non-negative; eps only guards an all-zero row against 0/0.
    l1 = descriptors.sum(axis=1, keepdims=True)
    return np.sqrt(descriptors / np.maximum(l1, eps)).astype(np.float32, copy=False)


def extract_sift(
    images: np.ndarray, *, n_jobs: int | None = None, progress: bool = True, desc: str = "SIFT"
) -> list[np.ndarray]:
    """Return the grayscale SIFT descriptors of each image: a list of n arrays (n_i, 128) float32.

    Images run on a thread pool; OpenCV releases the GIL, so threads give real parallelism. An
    image without keypoints yields an empty (0, 128) array.
    """
    images = _check_images(images)
    local = threading.local()

    def describe(image: np.ndarray) -> np.ndarray:
        # One detector per thread: sharing a cv2 object between threads is not documented as safe.
        if not hasattr(local, "sift"):
            local.sift = cv2.SIFT_create()
        gray = image if image.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
        _, descriptors = local.sift.detectAndCompute(np.ascontiguousarray(gray), None)
        if descriptors is None:
            return np.empty((0, SIFT_DIM), dtype=np.float32)
        return descriptors.astype(np.float32, copy=False)

    with ThreadPoolExecutor(max_workers=_n_workers(n_jobs)) as pool:
        # map keeps the input order, which is what ties descriptors back to their image
        results = pool.map(describe, images)
        return list(tqdm(results, total=len(images), desc=desc, unit="img", disable=not progress))


def assign_words(descriptors: np.ndarray, vocabulary: np.ndarray, chunk_size: int = _ASSIGN_CHUNK) -> np.ndarray:
    """Return the nearest centre of each descriptor, (n,) int64, by squared Euclidean distance.

    Uses ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2 as one matrix product per chunk of rows. The
    ||x||^2 term is the same for every centre of a row, so it cannot change the argmin and is
    left out. Ties go to the lower centre index (np.argmin).
    """
    descriptors = np.asarray(descriptors, dtype=np.float32)
    vocabulary = np.asarray(vocabulary, dtype=np.float32)
    words = np.empty(len(descriptors), dtype=np.int64)
    centre_sq = np.einsum("ij,ij->i", vocabulary, vocabulary)
    for start in range(0, len(descriptors), chunk_size):
        block = descriptors[start : start + chunk_size]
        partial = centre_sq[None, :] - 2.0 * (block @ vocabulary.T)
        words[start : start + len(block)] = np.argmin(partial, axis=1)
    return words


def word_histograms(descriptors: list[np.ndarray], vocabulary: np.ndarray) -> np.ndarray:
    """Return the word counts of each image, (n_images, n_words) float32."""
    n_images, n_words = len(descriptors), len(vocabulary)
    counts = np.fromiter((len(d) for d in descriptors), dtype=np.int64, count=n_images)
    if counts.sum() == 0:
        return np.zeros((n_images, n_words), dtype=np.float32)
    words = assign_words(np.concatenate(descriptors), vocabulary)
    owner = np.repeat(np.arange(n_images, dtype=np.int64), counts)
    # One bincount over a flattened (image, word) key builds every histogram at once.
    flat = np.bincount(owner * n_words + words, minlength=n_images * n_words)
    return flat.reshape(n_images, n_words).astype(np.float32)


def power_normalise(vectors: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Return ``sign(v) * |v| ** alpha`` element-wise, float32 (alpha 0.5: the signed square root).

    Damps "bursts" (one repeated structure whose many descriptors dominate a vector) while
    keeping each component's sign, which for VLAD says on which side of the centre the
    residuals fall.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    return (np.sign(vectors) * np.abs(vectors) ** alpha).astype(np.float32, copy=False)


def vlad_vectors(
    descriptors: list[np.ndarray],
    vocabulary: np.ndarray,
    *,
    power_normalisation: bool = True,
    intra_normalisation: bool = False,
) -> np.ndarray:
    """Return the VLAD vectors of each image, (n_images, n_words * 128) float32, rows L2-normalised.

    For image i and word w, block w of the vector is ``sum (x - c_w)`` over the descriptors x of
    the image whose nearest centre is ``c_w`` (zero when none is). The blocks are concatenated in
    word order, then, in this order: signed square root of every component (when
    ``power_normalisation``), L2 normalisation of every block on its own (when
    ``intra_normalisation``; a zero block stays zero), and L2 normalisation of the whole vector.
    An image without descriptors gets an all-zero row.
    """
    vocabulary = np.asarray(vocabulary, dtype=np.float32)
    n_images, (n_words, dim) = len(descriptors), vocabulary.shape
    counts = np.fromiter((len(d) for d in descriptors), dtype=np.int64, count=n_images)
    sums = np.zeros((n_images * n_words, dim), dtype=np.float64)
    if counts.sum():
        stacked = np.concatenate(descriptors).astype(np.float32, copy=False)
        words = assign_words(stacked, vocabulary)
        owner = np.repeat(np.arange(n_images, dtype=np.int64), counts)
        # one unbuffered scatter-add over the flattened (image, word) key sums every block at once
        np.add.at(sums, owner * n_words + words, stacked - vocabulary[words])
    blocks = sums.reshape(n_images, n_words, dim).astype(np.float32)
    if power_normalisation:
        blocks = power_normalise(blocks)
    if intra_normalisation:
        norms = np.linalg.norm(blocks, axis=2, keepdims=True)
        blocks = np.divide(blocks, norms, out=np.zeros_like(blocks), where=norms > 0)
    return _l2_normalise(blocks.reshape(n_images, n_words * dim))


def _l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Return the rows of ``vectors`` scaled to unit L2 norm; all-zero rows stay zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0).astype(np.float32, copy=False)


class NoKeypointsWarning(UserWarning):
    """Some images have no SIFT keypoints, so their BoVW vector is all zeros (one warning per fit or search)."""


def _warn_empty(n_empty: int, n_total: int, what: str, stacklevel: int) -> None:
    """Warn once that ``n_empty`` of ``n_total`` images had no SIFT keypoints."""
    if n_empty:
        warnings.warn(
            f"{n_empty} of {n_total} {what} have no SIFT keypoints; their BoVW vector is all zeros, "
            "so their cosine similarity with every image is 0",
            NoKeypointsWarning,
            stacklevel=stacklevel + 1,
        )


def words_advice(n_words: int, n_descriptors: int, n_images: int) -> str:
    """Why ``n_words`` visual words cannot be learnt from ``n_descriptors`` descriptors, and which setting can."""
    if n_descriptors == 0:
        return (
            f"the {n_images} database images have no SIFT keypoints at all (flat or tiny images), so no "
            "vocabulary can be learnt; use larger or more textured images (a larger SIZE)"
        )
    suggested = max(1, min(n_descriptors, n_descriptors // 10))  # about ten descriptors per word
    return (
        f"n_words={n_words} visual words need at least {n_words} SIFT descriptors, but the {n_images} database "
        f"images have {n_descriptors} ({n_descriptors / n_images:.1f} per image). Any n_words <= {n_descriptors} "
        f"works; n_words={suggested} gives about ten descriptors per word. Set it with BOVW_WORDS: {suggested} "
        f"(VLAD_WORDS for VLAD) in a study profile, or in a recipe with --set words=[{suggested}] (bovw), "
        f"words={suggested} (dense, dense-init) or bovw_words={suggested} (dsi); or use more or larger images"
    )


class BoVW(BaseEstimator):
    """Bag-of-Visual-Words image retrieval: SIFT, k-means words, cosine similarity of histograms (or VLAD).

    ``fit`` extracts grayscale SIFT descriptors from the database images, learns ``n_words``
    visual words by k-means on them and stores one L2-normalised vector per database image: the
    word histogram, or with ``encoding="vlad"`` the VLAD vector. ``search`` encodes the queries
    the same way and returns the top-k database rows by cosine similarity, in the FAISS
    convention ``(D, I)``.

    Parameters
    ----------
    n_words : number of visual words K (the paper uses 200; VLAD is usually run with 16-64).
    encoding : "histogram" (word counts, the paper's) or "vlad" (per-word sums of the residuals
        to the word's centre, ``n_words * 128`` values; see :func:`vlad_vectors`).
    rootsift : use RootSIFT descriptors (L1-normalise, then element-wise square root).
    tfidf : weight histograms by ``idf = log(n_db / (1 + df))`` before L2 normalisation, with
        ``df`` the number of database images containing the word. With this smoothed form a
        word present in every database image gets a small *negative* weight (about -1/n_db),
        which can make cosine scores slightly negative. Histograms only: a ValueError with VLAD.
    power_normalisation : signed square root of every component before the L2 normalisation.
        None (default) means on for VLAD and off for histograms (for a histogram it is the
        Hellinger kernel between word distributions).
    intra_normalisation : VLAD only: L2-normalise each word's block before the final L2
        normalisation, so that no single word dominates the similarity.
    max_descriptors : k-means is fitted on at most this many database descriptors, drawn
        uniformly without replacement with ``random_state`` when there are more (None: all of
        them). Every descriptor is still assigned to a word for the histograms.
    n_init, max_iter, random_state : passed to ``sklearn.cluster.KMeans``.
    n_jobs : threads for SIFT extraction (None or -1: one per CPU core).
    progress : show a tqdm progress bar during SIFT extraction.

    Attributes
    ----------
    vocabulary_ : (n_words, 128) float32 k-means centres.
    index_ : (n_db, dim_) float32 L2-normalised database vectors (rows of images without
        keypoints are zero).
    dim_ : length of an image's vector: n_words (histogram) or n_words * 128 (VLAD).
    idf_ : (n_words,) float32 inverse document frequencies, only when ``tfidf``.
    n_descriptors_ : number of SIFT descriptors found in the database.
    empty_images_ : (m,) int64 database rows whose image has no SIFT keypoints.

    Notes
    -----
    An image without keypoints (a flat image, for instance) has an all-zero vector, which
    stays zero after normalisation, so its cosine similarity with every image is 0. A
    query without keypoints therefore receives the database in index order, all with score 0,
    and an empty database image always ranks behind every image that scores above 0.
    ``fit`` and ``transform`` each emit one :class:`NoKeypointsWarning` counting such images.

    Ties in score are broken by the lower database row. ``search`` returns ``min(k, n_db)``
    columns, so fewer than ``k`` when the database is smaller than ``k``.
    """

    def __init__(
        self,
        n_words: int = 200,
        *,
        encoding: str = "histogram",
        rootsift: bool = False,
        tfidf: bool = False,
        power_normalisation: bool | None = None,
        intra_normalisation: bool = False,
        max_descriptors: int | None = 200_000,
        n_init: int = 1,
        max_iter: int = 100,
        random_state: int = 0,
        n_jobs: int | None = None,
        progress: bool = True,
    ) -> None:
        self.n_words = n_words
        self.encoding = encoding
        self.rootsift = rootsift
        self.tfidf = tfidf
        self.power_normalisation = power_normalisation
        self.intra_normalisation = intra_normalisation
        self.max_descriptors = max_descriptors
        self.n_init = n_init
        self.max_iter = max_iter
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.progress = progress

    # -- fitting -------------------------------------------------------------------------------

    def fit(self, images: np.ndarray) -> BoVW:
        """Learn the vocabulary from database images (n, H, W, 3) uint8 RGB and index them."""
        self._fit(images)
        return self

    def fit_transform(self, images: np.ndarray) -> np.ndarray:
        """Fit on images (n, H, W, 3) and return their vectors (n, dim_) float32 (one SIFT pass)."""
        return self._fit(images).copy()

    def _fit(self, images: np.ndarray) -> np.ndarray:
        """Fit and return ``index_``."""
        self._check_params()
        images = _check_images(images)
        if len(images) == 0:
            raise ValueError("cannot fit BoVW on an empty set of images")
        descriptors = self._describe(images, desc="SIFT (database)")
        counts = np.array([len(d) for d in descriptors], dtype=np.int64)
        n_descriptors = int(counts.sum())
        if n_descriptors < self.n_words:
            raise ValueError(words_advice(self.n_words, n_descriptors, len(images)))
        vocabulary = self._kmeans(np.concatenate(descriptors))

        self.vocabulary_ = vocabulary
        self.n_descriptors_ = n_descriptors
        self.empty_images_ = np.flatnonzero(counts == 0)
        self.dim_ = self.n_words * (SIFT_DIM if self.encoding == "vlad" else 1)
        if hasattr(self, "idf_"):
            del self.idf_  # left over from an earlier fit with tfidf=True
        if self.encoding == "histogram":
            histograms = word_histograms(descriptors, vocabulary)
            if self.tfidf:
                document_frequency = (histograms > 0).sum(axis=0)
                self.idf_ = np.log(len(images) / (1.0 + document_frequency)).astype(np.float32)
            self.index_ = self._normalise_histograms(histograms)
        else:
            self.index_ = self._encode(descriptors)
        _warn_empty(len(self.empty_images_), len(images), "database images", stacklevel=3)
        return self.index_

    def _check_params(self) -> None:
        """Raise ValueError on hyper-parameters that cannot work."""
        if isinstance(self.n_words, bool) or not isinstance(self.n_words, Integral) or self.n_words < 1:
            raise ValueError(f"n_words must be an integer >= 1, got {self.n_words!r}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {self.encoding!r}; choose one of {ENCODINGS}")
        if self.encoding == "vlad" and self.tfidf:
            raise ValueError(
                "tfidf weights word counts and applies to encoding='histogram' only; VLAD has no "
                "counts to weight (use power_normalisation / intra_normalisation instead)"
            )
        if self.encoding == "histogram" and self.intra_normalisation:
            raise ValueError(
                "intra_normalisation normalises VLAD's per-word blocks; a histogram has one number "
                "per word, so it applies to encoding='vlad' only"
            )
        if self.max_descriptors is not None and (
            not isinstance(self.max_descriptors, Integral) or self.max_descriptors < self.n_words
        ):
            raise ValueError(
                f"max_descriptors must be None or an integer >= n_words={self.n_words}, got {self.max_descriptors!r}"
            )
        _n_workers(self.n_jobs)

    def _kmeans(self, descriptors: np.ndarray) -> np.ndarray:
        """Return k-means centres (n_words, 128) float32 fitted on (a subsample of) ``descriptors``."""
        if self.max_descriptors is not None and len(descriptors) > self.max_descriptors:
            # k-means cost grows with the number of points; a uniform sample of this size already
            # pins down 200 centres well, and seeding it keeps the vocabulary reproducible.
            rng = np.random.default_rng(self.random_state)
            keep = np.sort(rng.choice(len(descriptors), size=self.max_descriptors, replace=False))
            descriptors = descriptors[keep]
        kmeans = KMeans(
            n_clusters=self.n_words, n_init=self.n_init, max_iter=self.max_iter, random_state=self.random_state
        )
        kmeans.fit(descriptors)
        return kmeans.cluster_centers_.astype(np.float32)

    # -- encoding ------------------------------------------------------------------------------

    def _describe(self, images: np.ndarray, desc: str) -> list[np.ndarray]:
        """Return per-image descriptors (n_i, 128) float32, RootSIFT when asked for."""
        descriptors = extract_sift(images, n_jobs=self.n_jobs, progress=self.progress, desc=desc)
        if self.rootsift:
            descriptors = [rootsift(d) for d in descriptors]
        return descriptors

    @property
    def _power(self) -> bool:
        """Whether the signed square root is applied (None: the encoding's default)."""
        return self.encoding == "vlad" if self.power_normalisation is None else bool(self.power_normalisation)

    def _encode(self, descriptors: list[np.ndarray]) -> np.ndarray:
        """Return the vectors (n, dim_) float32 of per-image descriptors, rows L2-normalised."""
        if self.encoding == "vlad":
            return vlad_vectors(
                descriptors,
                self.vocabulary_,
                power_normalisation=self._power,
                intra_normalisation=self.intra_normalisation,
            )
        return self._normalise_histograms(word_histograms(descriptors, self.vocabulary_))

    def _normalise_histograms(self, histograms: np.ndarray) -> np.ndarray:
        """Return histograms (n, n_words) tf-idf weighted, power-normalised (each if on) and L2-normalised."""
        if self.tfidf:
            histograms = histograms * self.idf_[None, :]
        if self._power:
            histograms = power_normalise(histograms)
        return _l2_normalise(histograms)

    def transform(self, images: np.ndarray) -> np.ndarray:
        """Return the vectors (n, dim_) float32 of images (n, H, W, 3), rows L2-normalised."""
        check_is_fitted(self, "index_")
        images = _check_images(images)
        descriptors = self._describe(images, desc="SIFT (queries)")
        _warn_empty(sum(len(d) == 0 for d in descriptors), len(images), "images", stacklevel=2)
        return self._encode(descriptors)

    # -- search --------------------------------------------------------------------------------

    def search(self, query_images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (D, I) for query images (Q, H, W, 3): cosine scores (Q, k') float32, rows (Q, k') int64.

        ``k' = min(k, n_db)``; each row is sorted by descending score, ties by lower database row.
        """
        check_is_fitted(self, "index_")
        k = _check_k(k)  # before the SIFT pass, so a bad k fails fast
        return self.search_vectors(self.transform(query_images), k)

    def search_vectors(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (D, I) for vectors (Q, dim_) from ``transform``: scores and rows as in ``search``."""
        check_is_fitted(self, "index_")
        k = min(_check_k(k), len(self.index_))
        query_vectors = np.asarray(query_vectors, dtype=np.float32)
        if query_vectors.ndim != 2 or query_vectors.shape[1] != self.index_.shape[1]:
            raise ValueError(f"query_vectors must have shape (Q, {self.index_.shape[1]}), got {query_vectors.shape}")
        n_queries = len(query_vectors)
        scores = np.empty((n_queries, k), dtype=np.float32)
        rows = np.empty((n_queries, k), dtype=np.int64)
        for start in range(0, n_queries, _SEARCH_CHUNK):
            similarity = query_vectors[start : start + _SEARCH_CHUNK] @ self.index_.T
            # A stable sort of the negated scores keeps tied rows in index order; argpartition
            # would not, and the database sizes here make a full sort cheap.
            order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
            rows[start : start + len(order)] = order
            scores[start : start + len(order)] = np.take_along_axis(similarity, order, axis=1)
        return scores, rows
