"""A filtered top-k over an index that cannot filter inside its search (HNSW, and BM25 over a large id set).

The caller knows which ids pass the filter (an SQL query over its own rows).
When few do, ranking exactly those is cheapest and misses nothing; when many
do, an unfiltered search asked for more results than needed usually holds k
that pass, and only when it does not is the exact ranking paid for. RAG
filters chunks by metadata this way; a semantic cache scoped by tenant would
filter its entries the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["EXACT_LIMIT", "Hits", "filtered_search"]

#: A filtered search ranks exactly when at most this many ids pass the filter.
EXACT_LIMIT = 20_000

Hits = list[tuple[int, float]]  # (id, score), best first


def filtered_search(
    search: Callable[[int], Hits], exact: Callable[[], Hits], allowed: np.ndarray, total: int, k: int
) -> Hits:
    """The k best of `allowed` (sorted int64 ids): exactly when few, else from an oversampled unfiltered
    `search(n)`, falling back to `exact()` when too few of its results pass. `total`: ids in the index."""
    if len(allowed) <= EXACT_LIMIT:
        return exact()
    fraction = len(allowed) / max(1, total)
    wanted = min(total, int(k / fraction * 2) + k)
    hits = search(wanted)
    passed = np.isin(np.fromiter((i for i, _ in hits), dtype=np.int64, count=len(hits)), allowed)
    kept = [hit for hit, ok in zip(hits, passed, strict=True) if ok][:k]
    return kept if len(kept) >= k else exact()
