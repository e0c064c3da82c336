"""Image IDs: the schemes that assign them, the token codec, and the prefix trie of valid IDs.

An ID is a sequence of *content tokens* ``0 .. base-1`` (digits for the paper's dense IDs,
``base = 10``). Three special tokens follow the content tokens in the vocabulary:
``BOS = base``, ``EOS = base + 1``, ``PAD = base + 2``. A decoder reads ``[BOS, t1 .. tL]``
and is trained to emit ``[t1 .. tL, EOS]``; shorter IDs are padded with ``PAD``.

Row ``r`` of an indexed database has ID ``codec.codes[r]``. For the dense schemes the
database is stored in ID order, so row ``r`` has the number ``r`` written with a fixed
number of digits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

DIGITS = 10  #: content tokens of the paper's decimal IDs


N_SPECIAL = 3  #: BOS, EOS, PAD follow the content tokens


#: Schemes implemented here. Semantic and atomic IDs build on the same codec (see IDCodec).
ID_SCHEMES = ("random", "clustered")


def dense_id_order(labels: np.ndarray, scheme: str, seed: int = 0) -> np.ndarray:
    """Return the order (n,) in which database items receive the consecutive IDs 0..n-1.

    ``random``: the database shuffled (the paper's "dense random IDs").
    ``clustered``: items grouped by class (classes in label order, shuffled within a class),
    so that same-class images get consecutive numbers (the paper's "dense clustered IDs").
    For multi-label data (COCO) ``labels`` are the primary labels, so images are grouped by
    their primary (rarest) category.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    if scheme == "random":
        return order
    if scheme == "clustered":
        # a stable sort of a random permutation by class keeps the shuffle inside each class
        return order[np.argsort(labels[order], kind="stable")]
    raise ValueError(f"unknown ID scheme {scheme!r}; choose one of {ID_SCHEMES}")


def decimal_codes(n: int, n_digits: int | None = None) -> list[tuple[int, ...]]:
    """Return the n decimal IDs 0..n-1 as digit tuples of a fixed length (zero-padded)."""
    if n < 1:
        raise ValueError("an index needs at least one ID")
    width = n_digits or len(str(n - 1))
    if len(str(n - 1)) > width:
        raise ValueError(f"{n} IDs need {len(str(n - 1))} digits, got n_digits={width}")
    return [tuple(int(c) for c in str(i).zfill(width)) for i in range(n)]


@dataclass(frozen=True)
class PrefixTrie:
    """The prefix trie of a set of token sequences, as tensors a batched beam search can index.

    ``next_node[v, t]`` is the node reached from node ``v`` by token ``t`` (-1: not allowed).
    Node 0 is the root. Every ID ends with an edge on EOS into a *terminal* node; a terminal
    node allows only PAD, which loops back to itself, so finished hypotheses can ride along
    while longer ones are still being decoded. ``row[v]`` is the database row whose ID ends
    at terminal node ``v`` (-1 for inner nodes).
    """

    next_node: torch.Tensor  # (num_nodes, vocab_size) int64
    row: torch.Tensor  # (num_nodes,) int64
    depth: torch.Tensor  # (num_nodes,) int64, tokens from the root

    @property
    def num_nodes(self) -> int:
        return self.next_node.shape[0]

    def to(self, device: torch.device | str) -> PrefixTrie:
        """Return the trie with its tables on ``device``."""
        return PrefixTrie(self.next_node.to(device), self.row.to(device), self.depth.to(device))

    def allowed(self, node: int) -> list[int]:
        """Tokens allowed after node ``node``."""
        return torch.nonzero(self.next_node[node] >= 0).flatten().tolist()


class IDCodec:
    """Encode database rows as token sequences and back; holds the trie of the IDs that exist.

    ``codes[r]`` is the content-token tuple of row ``r``. All tuples must be distinct and use
    tokens in ``0 .. base-1``. ``base`` is 10 for decimal IDs; a semantic scheme with wider
    levels or an atomic scheme (one token per image, ``base = n``) uses the same class.
    """

    def __init__(self, codes: Sequence[Sequence[int]], base: int = DIGITS):
        codes = [tuple(int(t) for t in c) for c in codes]
        if not codes:
            raise ValueError("an index needs at least one ID")
        if any(len(c) == 0 for c in codes):
            raise ValueError("every ID needs at least one token")
        lookup = {c: r for r, c in enumerate(codes)}
        if len(lookup) != len(codes):
            raise ValueError("IDs must be distinct: two database rows share an ID")
        flat = [t for c in codes for t in c]
        if min(flat) < 0 or max(flat) >= base:
            raise ValueError(f"ID tokens must lie in 0..{base - 1}")
        self.codes = codes
        self.base = base
        self._lookup = lookup
        self.trie = self._build_trie()

    # -- vocabulary ---------------------------------------------------------------------
    @property
    def bos(self) -> int:
        return self.base

    @property
    def eos(self) -> int:
        return self.base + 1

    @property
    def pad(self) -> int:
        return self.base + 2

    @property
    def vocab_size(self) -> int:
        return self.base + N_SPECIAL

    @property
    def max_length(self) -> int:
        """Decoder steps for the longest ID: its content tokens plus EOS."""
        return max(len(c) for c in self.codes) + 1

    def __len__(self) -> int:
        return len(self.codes)

    # -- encoding -----------------------------------------------------------------------
    def targets(self, rows: Sequence[int] | np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        """Return decoder targets (n, max_length): content tokens, EOS, then PAD."""
        table = self._table()
        return table if rows is None else table[torch.as_tensor(rows, dtype=torch.long)]

    def decoder_inputs(self, targets: torch.Tensor) -> torch.Tensor:
        """Shift targets right behind BOS (teacher forcing): (n, L) -> (n, L)."""
        bos = torch.full_like(targets[:, :1], self.bos)
        inputs = torch.cat([bos, targets[:, :-1]], dim=1)
        # after EOS the model reads PAD, not EOS, so the two cannot be confused
        return inputs.masked_fill(inputs == self.eos, self.pad)

    def _table(self) -> torch.Tensor:
        if not hasattr(self, "_cached_table"):
            table = torch.full((len(self.codes), self.max_length), self.pad, dtype=torch.long)
            for r, code in enumerate(self.codes):
                table[r, : len(code)] = torch.tensor(code)
                table[r, len(code)] = self.eos
            self._cached_table = table
        return self._cached_table

    # -- decoding -----------------------------------------------------------------------
    def lookup(self, tokens: Sequence[int]) -> int:
        """Return the database row whose ID is ``tokens`` (EOS/PAD ignored), or -1 if none."""
        content = tuple(int(t) for t in tokens if int(t) < self.base)
        return self._lookup.get(content, -1)

    def to_string(self, row: int) -> str:
        """The ID of ``row`` as text: digits run together for decimal IDs, dash-joined otherwise."""
        code = self.codes[row]
        return "".join(map(str, code)) if self.base <= 10 else "-".join(map(str, code))

    def strings(self) -> list[str]:
        """All IDs as text, in row order."""
        return [self.to_string(r) for r in range(len(self.codes))]

    # -- trie ---------------------------------------------------------------------------
    def _build_trie(self) -> PrefixTrie:
        children: list[dict[int, int]] = [{}]
        depth = [0]
        row = [-1]

        def child(node: int, token: int) -> int:
            nxt = children[node].get(token)
            if nxt is None:
                nxt = len(children)
                children[node][token] = nxt
                children.append({})
                depth.append(depth[node] + 1)
                row.append(-1)
            return nxt

        for r, code in enumerate(self.codes):
            node = 0
            for token in code:
                node = child(node, token)
            terminal = child(node, self.eos)
            row[terminal] = r
            children[terminal][self.pad] = terminal

        next_node = torch.full((len(children), self.vocab_size), -1, dtype=torch.long)
        for node, edges in enumerate(children):
            if edges:
                tokens = torch.tensor(list(edges.keys()))
                next_node[node, tokens] = torch.tensor(list(edges.values()))
        return PrefixTrie(next_node, torch.tensor(row), torch.tensor(depth))


def make_codec(n: int) -> IDCodec:
    """The codec of the paper's dense decimal IDs for an index of ``n`` images (rows in ID order).

    Random and clustered IDs share this codec; they differ in which image sits in which row
    (see :func:`dense_id_order`).
    """
    return IDCodec(decimal_codes(n), base=DIGITS)
