"""ID schemes beyond the paper's dense numbers, and the one function that gives a database its codec.

The paper numbered the indexed images 0..n-1 in decimal (``random``: shuffled; ``clustered``:
grouped by class). Three further schemes change what the tokens of an ID *mean*:

* ``semantic`` -- hierarchical k-means, as in the original DSI (Tay et al., 2022): the indexed
  images' embeddings are split into ``k`` clusters; a cluster of more than ``c`` images is split
  again, recursively; the members of a cluster of at most ``c`` images are numbered 0..c-1. An
  ID is the path of cluster numbers from the root, then that leaf number, so images with
  similar embeddings share a prefix. IDs have variable length; tokens lie in 0..max(k, c)-1.
* ``rq`` -- residual quantisation (as in TIGER-style semantic IDs): ``levels`` k-means
  codebooks of ``codebook_size`` codewords each; level 1 quantises the embedding, level l the
  residual left by levels 1..l-1. The code is the tuple of codeword indices. Two images can get
  the same code (a *collision*): see :func:`resolve_collisions` for the rule that separates them.
* ``atomic`` -- one output token per indexed image: row r has ID ``(r,)`` in a vocabulary of
  ``base = n`` content tokens. Nothing is shared between IDs.

Embeddings come from any encoder as an (n_index, d) float array; by default
:func:`bovw_embeddings` (tf-idf weighted, L2-normalised BoVW histograms of the indexed images).

Decoding is constrained to the prefix trie of the IDs that exist (``IDCodec.trie``), so the
beam search cannot return a token sequence that is not an ID: its invalid-ID rate is 0 by
construction. :func:`vitdsi_utils.model.decoding.invalid_id_rates` measures it anyway, beside the rate of free (greedy,
unconstrained) decoding, which says how far the model on its own strays from the ID set.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from vitdsi_utils.bovw import BoVW
from vitdsi_utils.ids.codec import ID_SCHEMES, IDCodec, make_codec


class Database(Protocol):
    """What a scheme reads of a database (:class:`vitdsi_utils.data.database.Database` has it): its
    settings (``id_scheme``, ``seed``), the number of indexed images and ``split(role) -> (images, labels)``.
    Typed structurally, so this module does not import the database module, which imports it."""

    settings: dict[str, Any]
    n_index: int

    def split(self, role: str) -> tuple[np.ndarray, np.ndarray]: ...


#: Every scheme :func:`codec_for` knows; the first two are the paper's dense decimal IDs.
CODEC_SCHEMES = (*ID_SCHEMES, "semantic", "rq", "atomic")


#: Schemes that need embeddings of the indexed images.
EMBEDDING_SCHEMES = ("semantic", "rq")


Code = tuple[int, ...]


# ------------------------------------------------------------------------------------------
# Embeddings
# ------------------------------------------------------------------------------------------
def check_embeddings(embeddings: Any, n: int | None = None) -> np.ndarray:
    """Return ``embeddings`` as a finite float64 array (n, d), or raise a ValueError that says what is wrong."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"embeddings must be a 2-D array (n_images, dim), got shape {x.shape}")
    if n is not None and x.shape[0] != n:
        raise ValueError(
            f"embeddings have {x.shape[0]} rows but the database indexes {n} images; pass one row per "
            "indexed image, in database row order (db.split('index'))"
        )
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinite values")
    return x


def bovw_embeddings(images: np.ndarray, *, n_words: int = 200, seed: int = 0, tfidf: bool = True) -> np.ndarray:
    """BoVW vectors of ``images`` (n, H, W, 3) uint8: (n, n_words) float32, tf-idf weighted and L2-normalised.

    The vocabulary is fitted on these images themselves (as the BoVW baseline fits it on the
    indexed images). Images without SIFT keypoints get an all-zero row (BoVW warns about them).
    """

    return BoVW(n_words, tfidf=tfidf, random_state=seed, progress=False).fit_transform(images)


def pixel_embeddings(images: np.ndarray, side: int = 8) -> np.ndarray:
    """Raw-pixel vectors: each image (H, W, 3) uint8 average-pooled to ``side`` x ``side`` RGB, centred, L2-normalised.

    A cheap encoder-free baseline for the clustering schemes: (n, side * side * 3) float32.
    ``side`` must divide the image size.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (n, H, W, 3), got shape {images.shape}")
    n, h, w, _ = images.shape
    if h % side or w % side:
        raise ValueError(f"side {side} must divide the image size {h}x{w}")
    pooled = images.reshape(n, side, h // side, side, w // side, 3).astype(np.float64).mean(axis=(2, 4))
    flat = pooled.reshape(n, -1)
    flat -= flat.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return np.divide(flat, norms, out=np.zeros_like(flat), where=norms > 0).astype(np.float32)


# ------------------------------------------------------------------------------------------
# k-means building block
# ------------------------------------------------------------------------------------------
def _kmeans_labels(x: np.ndarray, n_clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels (n,), centres (m, d)) of k-means with at most ``n_clusters`` clusters.

    Labels are renumbered 0..m-1 in order of first appearance, with m the number of non-empty
    clusters (fewer than asked for when the points have fewer distinct values).
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    n_clusters = min(n_clusters, len(x))
    if n_clusters == 1:
        return np.zeros(len(x), dtype=np.int64), x.mean(axis=0, keepdims=True)
    with warnings.catch_warnings():
        # duplicate points give fewer distinct clusters than asked for; handled below
        warnings.simplefilter("ignore", ConvergenceWarning)
        kmeans = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed).fit(x)
    _, first, inverse = np.unique(kmeans.labels_, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))  # cluster -> its position by first appearance
    labels = rank[inverse].astype(np.int64)
    centres = np.stack([x[labels == j].mean(axis=0) for j in range(len(first))])
    return labels, centres


# ------------------------------------------------------------------------------------------
# Hierarchical k-means (semantic IDs)
# ------------------------------------------------------------------------------------------
def hierarchical_kmeans_codes(embeddings: Any, k: int = 10, c: int = 10, seed: int = 0) -> list[Code]:
    """Semantic IDs by recursive k-means: one distinct code per row of ``embeddings`` (n, d).

    A group of more than ``c`` items is split by k-means into (at most) ``k`` clusters, and each
    cluster's number becomes the next token; a group of at most ``c`` items numbers its members
    0..size-1 (in row order) as the last token. So every prefix is a cluster, every leaf holds
    at most ``c`` items, tokens before the last lie in 0..k-1 and the last in 0..c-1.

    When k-means cannot split a group (all its points are equal), the group is cut into ``k``
    near-equal runs of rows instead, so the recursion always ends.
    """
    x = check_embeddings(embeddings)
    if k < 2:
        raise ValueError(f"the branching factor k must be at least 2, got {k}")
    if c < 1:
        raise ValueError(f"the leaf size c must be at least 1, got {c}")
    codes: list[Code] = [()] * len(x)
    stack: list[tuple[np.ndarray, Code]] = [(np.arange(len(x)), ())]
    while stack:
        members, prefix = stack.pop()
        if len(members) <= c:
            for j, row in enumerate(members):
                codes[row] = prefix + (j,)
            continue
        labels, _ = _kmeans_labels(x[members], k, seed)
        if labels.max() == 0:  # identical points: split by position, so the group shrinks
            groups = np.array_split(members, min(k, len(members)))
        else:
            groups = [members[labels == j] for j in range(labels.max() + 1)]
        for j, group in enumerate(groups):
            stack.append((group, prefix + (j,)))
    return codes


# ------------------------------------------------------------------------------------------
# Residual quantisation
# ------------------------------------------------------------------------------------------
@dataclass
class ResidualCodes:
    """Residual quantisation of n vectors: ``codes`` (n, levels) and the codebook of each level.

    ``relative_error[l]`` is ||x - reconstruction after levels 0..l||^2 / ||x - mean||^2 summed
    over the rows: how much of the spread the first l+1 levels leave unexplained.
    """

    codes: np.ndarray  # (n, levels) int64
    codebooks: list[np.ndarray]  # per level (m_l, d), m_l <= codebook_size
    relative_error: list[float] = field(default_factory=list)

    def reconstruct(self) -> np.ndarray:
        """The quantised vectors (n, d): the sum of each row's codewords over the levels."""
        return sum(book[self.codes[:, level]] for level, book in enumerate(self.codebooks))


def residual_quantise(embeddings: Any, levels: int = 2, codebook_size: int = 16, seed: int = 0) -> ResidualCodes:
    """Quantise each row of ``embeddings`` (n, d) with ``levels`` k-means codebooks over the residuals.

    Level 0 runs k-means with ``codebook_size`` centres on the vectors; level l on what levels
    0..l-1 left (vector minus the sum of its codewords). A level has fewer codewords when the
    residuals have fewer distinct values. Codes are not made distinct here (see
    :func:`resolve_collisions`).
    """
    x = check_embeddings(embeddings)
    if levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}")
    if codebook_size < 2:
        raise ValueError(f"codebook_size must be at least 2, got {codebook_size}")
    residual = x.copy()
    spread = float(((x - x.mean(axis=0)) ** 2).sum()) or 1.0
    codes = np.zeros((len(x), levels), dtype=np.int64)
    codebooks, errors = [], []
    for level in range(levels):
        labels, centres = _kmeans_labels(residual, codebook_size, seed + level)
        codes[:, level] = labels
        codebooks.append(centres)
        residual = residual - centres[labels]
        errors.append(float((residual**2).sum()) / spread)
    return ResidualCodes(codes, codebooks, errors)


def collision_rate(codes: Sequence[Sequence[int]]) -> float:
    """The share of items whose code is shared with at least one other item (0 when all are distinct)."""
    codes = [tuple(int(t) for t in c) for c in codes]
    if not codes:
        return 0.0
    counts = Counter(codes)
    return sum(counts[c] > 1 for c in codes) / len(codes)


def resolve_collisions(codes: Sequence[Sequence[int]]) -> list[Code]:
    """Make equal-length codes distinct: every member of a group of equal codes gets one more token.

    The rule: if m > 1 items share a code, each of them gets the code followed by its rank
    0..m-1 within the group, counted in row order; an item whose code is unique keeps it as is.
    All input codes have the same length L, so a lengthened code (L + 1 tokens) can never equal
    a kept one (L tokens), and the result is distinct.
    """
    codes = [tuple(int(t) for t in c) for c in codes]
    if len({len(c) for c in codes}) > 1:
        raise ValueError("resolve_collisions needs codes of one length (residual-quantisation codes)")
    counts = Counter(codes)
    seen: defaultdict[Code, int] = defaultdict(int)
    out = []
    for code in codes:
        if counts[code] > 1:
            out.append(code + (seen[code],))
            seen[code] += 1
        else:
            out.append(code)
    return out


# ------------------------------------------------------------------------------------------
# Atomic IDs
# ------------------------------------------------------------------------------------------
def atomic_codes(n: int) -> list[Code]:
    """One single-token ID per item: row r -> ``(r,)`` (an :class:`IDCodec` with ``base = n``)."""
    if n < 1:
        raise ValueError("an index needs at least one ID")
    return [(r,) for r in range(n)]


def atomic_codec(n: int) -> IDCodec:
    """The codec of atomic IDs for ``n`` images: ``n`` content tokens plus BOS/EOS/PAD."""
    return IDCodec(atomic_codes(n), base=n)


# ------------------------------------------------------------------------------------------
# One entry point: a database's codec for any scheme
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IDAssignment:
    """The IDs a scheme gave the indexed images of one database, with what it cost and how they look.

    ``collision_rate`` is measured on the codes before :func:`resolve_collisions` (only RQ can
    collide; the other schemes give distinct codes by construction). ``tag`` names the scheme
    and its parameters, e.g. ``semantic-bovw-k10-c10``; it is used in run-folder names.
    """

    scheme: str
    codec: IDCodec
    collision_rate: float = 0.0
    params: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def tag(self) -> str:
        p = self.params
        if self.scheme == "semantic":
            return f"semantic-{p['embedding']}-k{p['k']}-c{p['c']}"
        if self.scheme == "rq":
            return f"rq-{p['embedding']}-L{p['levels']}-K{p['codebook_size']}"
        return self.scheme

    def lengths(self) -> np.ndarray:
        """Content tokens of each ID (n,)."""
        return np.array([len(c) for c in self.codec.codes])

    def summary(self) -> dict[str, Any]:
        """One row of facts: scheme, tag, IDs, base, vocabulary, ID lengths, collision rate, seconds."""
        lengths = self.lengths()
        return {
            "ids": self.scheme,
            "tag": self.tag,
            "n_ids": len(self.codec),
            "base": self.codec.base,
            "vocab_size": self.codec.vocab_size,
            "mean_length": float(lengths.mean()),
            "max_length": int(lengths.max()),
            "collision_rate": self.collision_rate,
            "assign_s": self.seconds,
        }


def assign_ids(
    db: Database,
    scheme: str | None = None,
    *,
    embeddings: Any = None,
    embedding_name: str | None = None,
    k: int = 10,
    c: int = 10,
    levels: int = 2,
    codebook_size: int = 16,
    bovw_words: int = 200,
    seed: int | None = None,
) -> IDAssignment:
    """Give the indexed images of ``db`` IDs by ``scheme`` (default: the database's own, random or clustered).

    * ``random`` / ``clustered``: the paper's dense decimal IDs, exactly as before
      (``make_codec(db.n_index)``; the database's row order carries the scheme, so ``scheme``
      must be the one ``db`` was built with).
    * ``semantic``: :func:`hierarchical_kmeans_codes` with ``k`` and ``c``; base max(k, c).
    * ``rq``: :func:`residual_quantise` with ``levels`` and ``codebook_size``, then
      :func:`resolve_collisions`; base max(codebook_size, largest collision group).
    * ``atomic``: :func:`atomic_codec`.

    ``embeddings`` (n_index, d), one row per indexed image in database row order, feed the
    semantic and RQ schemes; without them, :func:`bovw_embeddings` of the indexed images with
    ``bovw_words`` words. ``embedding_name`` labels them in the tag (default ``bovw``, or
    ``given`` for an array passed in). ``seed`` (default: the database's) seeds every k-means.
    """
    own = db.settings["id_scheme"]
    scheme = scheme or own
    if scheme not in CODEC_SCHEMES:
        raise ValueError(f"unknown ID scheme {scheme!r}; choose one of {CODEC_SCHEMES}")
    seed = int(db.settings["seed"]) if seed is None else int(seed)
    n = db.n_index
    start = time.perf_counter()
    if scheme in ID_SCHEMES:
        if scheme != own:
            raise ValueError(
                f"this database was built with {own} IDs, and dense IDs follow its row order; build it with "
                f"build_database(..., id_scheme={scheme!r}) to get {scheme} IDs"
            )
        return IDAssignment(scheme, make_codec(n), seconds=time.perf_counter() - start)
    if scheme == "atomic":
        return IDAssignment(scheme, atomic_codec(n), seconds=time.perf_counter() - start)

    if embeddings is None:
        embeddings = bovw_embeddings(db.split("index")[0], n_words=bovw_words, seed=seed)
        name = embedding_name or "bovw"
    else:
        name = embedding_name or "given"
    x = check_embeddings(embeddings, n)
    if scheme == "semantic":
        codes = hierarchical_kmeans_codes(x, k=k, c=c, seed=seed)
        codec = IDCodec(codes, base=max(k, c))
        params = {"embedding": name, "k": k, "c": c, "seed": seed}
        return IDAssignment(scheme, codec, 0.0, params, time.perf_counter() - start)
    quantised = residual_quantise(x, levels=levels, codebook_size=codebook_size, seed=seed)
    raw = [tuple(row) for row in quantised.codes.tolist()]
    codes = resolve_collisions(raw)
    largest_group = max(Counter(raw).values())
    codec = IDCodec(codes, base=max(codebook_size, largest_group))
    params = {
        "embedding": name,
        "levels": levels,
        "codebook_size": codebook_size,
        "seed": seed,
        "relative_error": quantised.relative_error,
    }
    return IDAssignment(scheme, codec, collision_rate(raw), params, time.perf_counter() - start)


def codec_for(db: Database, scheme: str | None = None, **kwargs: Any) -> IDCodec:
    """The codec of ``db``'s indexed images under ``scheme``: :func:`assign_ids` without the facts around it.

    ``codec_for(db)`` is the codec the toolkit has always used for a database of dense IDs
    (``make_codec(db.n_index)``).
    """
    return assign_ids(db, scheme, **kwargs).codec


# ------------------------------------------------------------------------------------------
# Diagnostics
# ------------------------------------------------------------------------------------------
def _same_class_share(groups: Sequence[Sequence[int]]) -> float:
    """Among all pairs of items within the same group, the share with the same label (NaN without pairs)."""
    same = total = 0
    for group in groups:
        m = len(group)
        total += m * (m - 1) // 2
        same += sum(v * (v - 1) // 2 for v in Counter(group).values())
    return same / total if total else float("nan")


def sibling_agreement(codec: IDCodec, labels: Sequence[int]) -> tuple[float, float]:
    """(agreement, chance): how often two *sibling* IDs -- equal but for the last token -- share a class.

    ``agreement`` is the share of same-class pairs among all pairs of siblings; ``chance`` the
    same share among all pairs of items. Dense clustered IDs put a class's images side by side
    (agreement near 1), dense random IDs do not (near chance); for semantic and RQ IDs it
    measures how well the embedding's clusters follow the classes. Atomic IDs are all siblings
    of one another, so their agreement is the chance level.
    """
    labels = np.asarray(labels)
    if len(labels) != len(codec):
        raise ValueError(f"{len(labels)} labels for {len(codec)} IDs")
    groups: defaultdict[Code, list[int]] = defaultdict(list)
    for code, label in zip(codec.codes, labels.tolist()):
        groups[code[:-1]].append(label)
    return _same_class_share(list(groups.values())), _same_class_share([labels.tolist()])
