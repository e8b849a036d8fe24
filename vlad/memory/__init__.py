"""Memory banks of the few-shot scorers: the one exact nearest-neighbour search and the greedy coreset.

* :mod:`vlad.memory.knn`: :class:`KnnIndex` / :func:`knn_distances`, exact k-NN (L2 or cosine) as
  blocked matrix products with bounded memory, on CPU or GPU; :class:`BoundedIndex` prunes exactly.
* :mod:`vlad.memory.coreset`: :func:`greedy_coreset`, PatchCore's greedy k-center coreset, fast and
  exact against the plain loop :func:`greedy_coreset_reference`.
"""

from vlad.memory.coreset import coreset_size, greedy_coreset, greedy_coreset_reference
from vlad.memory.knn import (
    DEFAULT_MAX_BYTES,
    METRICS,
    BoundedIndex,
    InvalidSearchError,
    KnnIndex,
    knn_distances,
    resolve_prune,
    squared_norms,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "METRICS",
    "BoundedIndex",
    "InvalidSearchError",
    "KnnIndex",
    "coreset_size",
    "greedy_coreset",
    "greedy_coreset_reference",
    "knn_distances",
    "resolve_prune",
    "squared_norms",
]
