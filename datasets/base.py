"""The dataset object, its card, and the graph view that models consume (docs/protocol.md, "Data").

Users and items live in separate 0-based id spaces in :class:`RecDataset`. The graph view
(:class:`InteractionGraph`) puts users at node ids ``0..U-1`` and items at ``U..U+I-1`` and holds both directions of
every training pair, sorted by target node (CSR order), so that neighbourhood softmaxes, weighted propagation and
their backward passes need no sorting at run time.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

MODALITIES = ("v", "a", "t")
MODALITY_NAMES = {"v": "visual", "a": "acoustic", "t": "textual"}
SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A dataset that cannot be used. The message is one line: which file, what is wrong, what was expected."""

    def __init__(self, where: str, problem: str, expected: str | None = None):
        self.where, self.problem, self.expected = str(where), problem, expected
        message = f"{where}: {problem}"
        if expected:
            message += f" (expected {expected})"
        super().__init__(message)


@dataclass(frozen=True)
class WordBags:
    """Word-id text (docs/protocol.md, "Word-id text"): item ``item[k]`` contains word ``word[k]``; ``num_words`` is the
    vocabulary size.

    An item's textual feature is the mean of a learned word-embedding table over its words (zero if it has none).
    """

    item: Tensor  # [K] int64, item ids in 0..I-1
    word: Tensor  # [K] int64, word ids in 0..num_words-1
    num_words: int

    def to(self, device: torch.device | str) -> WordBags:
        return WordBags(self.item.to(device), self.word.to(device), self.num_words)

    def mean_embedding(self, table: Tensor, num_items: int) -> Tensor:
        """``[I, d]``: per item, the mean of ``table`` rows over its words; zeros for items without words."""
        summed = table.new_zeros(num_items, table.size(1)).index_add_(0, self.item, table[self.word])
        counts = torch.bincount(self.item, minlength=num_items).clamp_(min=1).to(table.dtype)
        return summed / counts.unsqueeze(1)


@dataclass(frozen=True)
class DatasetInfo:
    """What a model may know about a dataset when it is built: sizes and the shape of each modality.

    ``feature_dims`` maps each dense modality to its width. Word-id text appears as ``num_words`` (vocabulary size)
    instead, and its modality key ``"t"`` is then absent from ``feature_dims``.
    """

    num_users: int
    num_items: int
    feature_dims: Mapping[str, int] = field(default_factory=dict)
    num_words: int | None = None
    num_train_pairs: int = 0

    @property
    def modalities(self) -> tuple[str, ...]:
        """The dataset's modalities in canonical order (v, a, t), word-id text included."""
        present = set(self.feature_dims) | ({"t"} if self.num_words else set())
        return tuple(m for m in MODALITIES if m in present)


@dataclass(frozen=True)
class InteractionGraph:
    """The bipartite training graph as seen by models: both directions, users ``0..U-1``, items ``U..U+I-1``.

    Directed edges are sorted by (target, source), so ``rowptr`` is the CSR row pointer of the adjacency
    ``A[target, source]``. For training pair ``k = (u, i)`` there are two directed edges, ``u -> U+i`` and
    ``U+i -> u``; ``edge_pair[e]`` gives the pair ``k`` of directed edge ``e`` and ``reverse_edge[e]`` the position of
    the opposite direction. Because the pattern is symmetric, ``A^T`` has the same CSR structure with values
    ``w[reverse_edge]``: backward passes of weighted propagation reuse the forward's index structures.

    Item features travel with the graph (``features`` dense per modality, ``word_bags`` for word-id text), so that
    ``model(graph)`` is the whole forward input. Every index structure is computed once, at construction.
    """

    num_users: int
    num_items: int
    edge_index: Tensor  # [2, 2E] int64: row 0 source, row 1 target
    edge_pair: Tensor  # [2E] int64: training pair of each directed edge
    reverse_edge: Tensor  # [2E] int64: index of the opposite direction
    rowptr: Tensor  # [N+1] int64: CSR row pointer over targets
    features: Mapping[str, Tensor] = field(default_factory=dict)
    word_bags: WordBags | None = None

    @classmethod
    def from_pairs(
        cls,
        train: Tensor,
        num_users: int,
        num_items: int,
        features: Mapping[str, Tensor] | None = None,
        word_bags: WordBags | None = None,
    ) -> InteractionGraph:
        """Build the graph from training pairs ``[E, 2]`` (user, item) in separate id spaces."""
        train = torch.as_tensor(train, dtype=torch.long).reshape(-1, 2)
        num_pairs = train.size(0)
        users, items = train[:, 0], train[:, 1] + num_users
        source = torch.cat([users, items])
        target = torch.cat([items, users])
        pair = torch.arange(num_pairs).repeat(2)
        num_nodes = num_users + num_items
        # Stable sort by (target, source): one key, no ties between distinct edges of a simple graph.
        order = torch.argsort(target * num_nodes + source, stable=True)
        source, target, pair = source[order], target[order], pair[order]
        position = torch.empty_like(order)
        position[order] = torch.arange(order.numel())
        # Unsorted layout: edge k is u->i, edge E+k is i->u; the reverse of k is E+k and vice versa.
        unsorted_reverse = torch.cat([torch.arange(num_pairs) + num_pairs, torch.arange(num_pairs)])
        reverse_edge = position[unsorted_reverse[order]]
        counts = torch.bincount(target, minlength=num_nodes)
        rowptr = torch.zeros(num_nodes + 1, dtype=torch.long)
        torch.cumsum(counts, 0, out=rowptr[1:])
        return cls(
            num_users=num_users,
            num_items=num_items,
            edge_index=torch.stack([source, target]),
            edge_pair=pair,
            reverse_edge=reverse_edge,
            rowptr=rowptr,
            features=dict(features or {}),
            word_bags=word_bags,
        )

    @property
    def num_nodes(self) -> int:
        return self.num_users + self.num_items

    @property
    def num_edges(self) -> int:
        """Number of directed edges (twice the number of training pairs)."""
        return self.edge_index.size(1)

    @property
    def device(self) -> torch.device:
        return self.edge_index.device

    def degree(self) -> Tensor:
        """``[N]`` in-degree (= out-degree: the graph is symmetric) of every node."""
        return self.rowptr[1:] - self.rowptr[:-1]

    def user_to_item_mask(self) -> Tensor:
        """``[2E]`` bool: True where the edge goes from a user to an item (the item receives)."""
        return self.edge_index[1] >= self.num_users

    def to(self, device: torch.device | str) -> InteractionGraph:
        return dataclasses.replace(
            self,
            edge_index=self.edge_index.to(device),
            edge_pair=self.edge_pair.to(device),
            reverse_edge=self.reverse_edge.to(device),
            rowptr=self.rowptr.to(device),
            features={m: x.to(device) for m, x in self.features.items()},
            word_bags=self.word_bags.to(device) if self.word_bags is not None else None,
        )

    def pair_weights(self, edge_weight: Tensor) -> tuple[Tensor, Tensor]:
        """Split a per-directed-edge weight ``[2E]`` into per-training-pair weights ``(u<-i, i<-u)``, each ``[E]``."""
        num_pairs = self.num_edges // 2
        into_user = self.edge_index[1] < self.num_users
        user_side = edge_weight.new_empty(num_pairs)
        item_side = edge_weight.new_empty(num_pairs)
        user_side[self.edge_pair[into_user]] = edge_weight[into_user]
        item_side[self.edge_pair[~into_user]] = edge_weight[~into_user]
        return user_side, item_side


@dataclass
class DatasetCard:
    """Provenance and shape of a dataset: enough to tell two datasets apart and to cite one."""

    name: str
    source_format: str
    path: str | None
    num_users: int
    num_items: int
    split_counts: dict[str, int]
    modalities: dict[str, int]  # modality -> dim (word-id text: the word-embedding dim, see ``text_words``)
    checksums: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    split_seed: int | None = None
    ids_offset: bool | None = None  # official format: were item ids offset by U in the files?
    duplicates_dropped: dict[str, int] = field(default_factory=dict)
    leaking_pairs_dropped: dict[str, int] = field(default_factory=dict)
    val_test_overlap_dropped: int = 0  # test pairs that were also validation pairs (dropped from test)
    users_without_train: int = 0
    text_words: int | None = None  # vocabulary size when text is word ids
    noise_edges: int | None = None  # labelled false-positive train edges (synthetic or injected)
    parameters: dict[str, object] = field(default_factory=dict)  # generator / override parameters

    @property
    def density(self) -> float:
        total = sum(self.split_counts.values())
        return total / max(1, self.num_users * self.num_items)

    def digest(self) -> str:
        """A short stable hash of everything that identifies the data (not the path it was read from)."""
        identity = {k: v for k, v in dataclasses.asdict(self).items() if k != "path"}
        if not identity["val_test_overlap_dropped"]:  # a field added later: data without overlap keeps its digest
            del identity["val_test_overlap_dropped"]
        return hashlib.sha256(repr(sorted(identity.items())).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["density"] = self.density
        out["digest"] = self.digest()
        return out

    def rows(self) -> list[tuple[str, str]]:
        """The card as (field, value) rows for a two-column table."""
        rows = [
            ("name", self.name),
            ("format", self.source_format),
            ("path", self.path or "-"),
            ("users", f"{self.num_users:,}"),
            ("items", f"{self.num_items:,}"),
        ]
        rows += [(f"{split} pairs", f"{n:,}") for split, n in self.split_counts.items()]
        rows.append(("density", f"{self.density:.6f}"))
        for m, dim in self.modalities.items():
            label = f"{MODALITY_NAMES.get(m, m)} ({m})"
            value = f"{dim}-d" + (f" word ids, vocabulary {self.text_words:,}" if m == "t" and self.text_words else "")
            rows.append((label, value))
        if not self.modalities:
            rows.append(("modalities", "none (ID only)"))
        rows.append(("users without train", f"{self.users_without_train:,}"))
        if self.ids_offset is not None:
            rows.append(("item ids offset by U", "yes" if self.ids_offset else "no"))
        if self.split_seed is not None:
            rows.append(("split seed", str(self.split_seed)))
        if self.noise_edges is not None:
            rows.append(("labelled false-positive train edges", f"{self.noise_edges:,}"))
        for split, n in self.duplicates_dropped.items():
            if n:
                rows.append((f"duplicates dropped ({split})", f"{n:,}"))
        for split, n in self.leaking_pairs_dropped.items():
            if n:
                rows.append((f"pairs leaking train dropped ({split})", f"{n:,}"))
        if self.val_test_overlap_dropped:
            rows.append(("test pairs also in validation, dropped", f"{self.val_test_overlap_dropped:,}"))
        for key, value in self.parameters.items():
            rows.append((f"param {key}", str(value)))
        rows += [(f"sha256 {name}", digest[:16]) for name, digest in sorted(self.checksums.items())]
        rows.append(("digest", self.digest()))
        return rows


@dataclass
class RecDataset:
    """An implicit-feedback dataset: interaction pairs per split, item features per modality, and a card.

    Pairs are int64 tensors ``[n, 2]`` of (user, item) in separate 0-based id spaces. ``train_noise`` labels
    planted or injected false-positive training pairs when known (synthetic data, noise injection).
    """

    name: str
    num_users: int
    num_items: int
    train: Tensor
    val: Tensor
    test: Tensor
    features: dict[str, Tensor]
    card: DatasetCard
    word_bags: WordBags | None = None
    train_noise: Tensor | None = None
    _graph: InteractionGraph | None = field(default=None, repr=False, compare=False)

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.info().modalities

    def info(self) -> DatasetInfo:
        return DatasetInfo(
            num_users=self.num_users,
            num_items=self.num_items,
            feature_dims={m: int(x.size(1)) for m, x in self.features.items()},
            num_words=self.word_bags.num_words if self.word_bags is not None else None,
            num_train_pairs=int(self.train.size(0)),
        )

    def graph(self) -> InteractionGraph:
        """The training graph (built once per dataset object; the dataset is immutable after loading)."""
        if self._graph is None:
            self._graph = InteractionGraph.from_pairs(
                self.train, self.num_users, self.num_items, self.features, self.word_bags
            )
        return self._graph

    def split(self, name: str) -> Tensor:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def user_items(self, *splits: str) -> tuple[np.ndarray, np.ndarray]:
        """CSR ``(indptr [U+1], items)`` of each user's items over the given splits, items sorted per user."""
        pairs = torch.cat([self.split(s) for s in splits]).numpy() if splits else np.empty((0, 2), np.int64)
        return pairs_to_csr(pairs, self.num_users)


def pairs_to_csr(pairs: np.ndarray, num_users: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR of (user, item) pairs: ``indptr [U+1]`` and the items of each user, sorted."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    users, items = pairs[order, 0], pairs[order, 1]
    indptr = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=num_users), out=indptr[1:])
    return indptr, items
