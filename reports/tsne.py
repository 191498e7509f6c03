"""Figure 4 (docs/protocol.md, "Figure 4"): t-SNE of learned ID embeddings of GAT and GRCN for a few randomly chosen
users (stars) and their training items (circles), an edge from each user to each of their items, one colour per user,
side by side.

"Learned ID embeddings": the ID part of the final representations the runner stores for fig4 cells
(``Recommender.id_columns``). For GAT that is the whole vector (its output layer). For GRCN it is the first
``embedding_dim`` (64) columns, the graph part :math:`\\mathbf{e}_u` / :math:`\\mathbf{e}_i` (Eq. 9); the rest are the
modality blocks of Eq. 10. The runner stores the ID part only; :func:`id_columns` also reads stores that hold the
whole vector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.manifold import TSNE

from .plotting import new_figure, palette

SHARED_ITEM_COLOR = (0.55, 0.55, 0.55)
EXACT_TSNE_POINTS = 500


def id_columns(model: str, options: Mapping[str, Any], width: int) -> slice:
    """The columns of a stored embedding that hold the learned ID (graph) representation (module docstring)."""
    if model == "grcn":
        return slice(0, min(width, int(options.get("embedding_dim", 64))))
    return slice(0, width)


def choose_users(indptr: np.ndarray, *, count: int = 5, seed: int = 0, min_items: int = 3,
                 max_items: int = 25) -> np.ndarray:
    """``count`` users drawn at random (seeded) among those with ``min_items..max_items`` training items (few
    enough to read on a plot), sorted; falls back to every user with at least one item if too few qualify."""
    degree = np.diff(indptr)
    eligible = np.flatnonzero((degree >= min_items) & (degree <= max_items))
    if eligible.size < count:
        eligible = np.flatnonzero(degree > 0)
    if eligible.size == 0:
        raise ValueError("choose_users: no user has a training item")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(eligible, size=min(count, eligible.size), replace=False))


@dataclass(frozen=True)
class Neighbourhood:
    """The chosen users, the union of their training items, and the (user row, item row) edges between them."""

    users: np.ndarray
    items: np.ndarray
    edges: np.ndarray  # [n, 2]: index into users, index into items

    @classmethod
    def build(cls, users: np.ndarray, indptr: np.ndarray, train_items: np.ndarray) -> Neighbourhood:
        lists = [train_items[indptr[u]:indptr[u + 1]] for u in users]
        items = np.unique(np.concatenate(lists)) if lists else np.empty(0, np.int64)
        edges = [(k, int(np.searchsorted(items, i))) for k, row in enumerate(lists) for i in row]
        return cls(np.asarray(users), items, np.asarray(edges, dtype=np.int64).reshape(-1, 2))


def tsne_2d(vectors: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """2-d t-SNE coordinates; perplexity is lowered for small point sets (it must be below the number of points).

    The exact gradient is used up to a few hundred points: there it is faster than Barnes-Hut and not approximate.
    """
    n = vectors.shape[0]
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed,
                method="exact" if n <= EXACT_TSNE_POINTS else "barnes_hut")
    return tsne.fit_transform(np.asarray(vectors, dtype=np.float64))


def tsne_figure(panels: Sequence[tuple[str, np.ndarray, np.ndarray]], neighbourhood: Neighbourhood, *,
                seed: int = 0) -> Figure:
    """One panel per ``(title, user_embedding [U, d], item_embedding [I, d])`` (ID columns only), side by side.

    Users and items are embedded jointly by t-SNE (rows of both matrices stacked). Each chosen user is one star
    artist (``gid="user-star"``), items are circles in the colour of their user (grey when several chosen users
    share them), and one line per user-item training edge.
    """
    if not panels:
        raise ValueError("tsne_figure: no embeddings to plot")
    nb = neighbourhood
    colors = palette(len(nb.users))
    owners = np.zeros(nb.items.size, dtype=np.int64)
    shared = np.bincount(nb.edges[:, 1], minlength=nb.items.size) > 1
    owners[nb.edges[:, 1]] = nb.edges[:, 0]
    item_colors = [SHARED_ITEM_COLOR if shared[k] else colors[owners[k]] for k in range(nb.items.size)]
    figure, axes = new_figure(1, len(panels), panel_size=(5.0, 4.6))
    for ax, (title, user_embedding, item_embedding) in zip(axes[0], panels, strict=True):
        xy = tsne_2d(np.concatenate([user_embedding[nb.users], item_embedding[nb.items]]), seed=seed)
        user_xy, item_xy = xy[: nb.users.size], xy[nb.users.size:]
        segments = [(user_xy[u], item_xy[i]) for u, i in nb.edges]
        ax.add_collection(LineCollection(segments, colors=[colors[u] for u, _ in nb.edges], linewidths=0.7,
                                         alpha=0.5, zorder=1))
        ax.scatter(item_xy[:, 0], item_xy[:, 1], s=22, c=item_colors, marker="o", edgecolors="white",
                   linewidths=0.4, zorder=2)
        for k, user in enumerate(nb.users):
            ax.scatter(user_xy[k, 0], user_xy[k, 1], s=260, color=colors[k], marker="*", edgecolors="black",
                       linewidths=0.8, zorder=3, gid="user-star", label=f"user {int(user)}")
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.autoscale_view()
    items = Line2D([], [], marker="o", linestyle="", color=SHARED_ITEM_COLOR, label="training items (grey: shared)")
    handles, _ = axes[0][-1].get_legend_handles_labels()
    axes[0][-1].legend(handles=[*handles, items], fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5),
                       markerscale=0.5)
    return figure
