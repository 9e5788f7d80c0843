"""Near-duplicates across the train/validation split, found with the backbone's embeddings and FAISS.

An image in training that (nearly) repeats a validation image lets the model be graded on what it memorised,
inflating validation accuracy. Every training image within ``threshold`` cosine of a validation image is
reported; with ``--dedup`` it is removed from training (the validation set is never changed).
"""

from __future__ import annotations

import numpy as np

__all__ = ["near_duplicates"]


def near_duplicates(train: np.ndarray, val: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """``(train row, val row, cosine)`` for every pair at or above ``threshold`` (rows are L2-normalised),
    highest first."""
    import faiss

    if len(train) == 0 or len(val) == 0:
        return []
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(np.ascontiguousarray(train, np.float32))
    # range_search keeps pairs with inner product > radius; nudge the radius so "at or above" holds
    lims, dist, ids = index.range_search(np.ascontiguousarray(val, np.float32), float(np.nextafter(threshold, -1)))
    pairs = [(int(ids[j]), v, float(dist[j])) for v in range(len(val)) for j in range(lims[v], lims[v + 1])
             if dist[j] >= threshold - 1e-6]
    return sorted(pairs, key=lambda p: (-p[2], p[1], p[0]))
