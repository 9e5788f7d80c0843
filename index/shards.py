"""Sharded indexes (``lens index build --shards N``): N IVF indexes that share one trained coarse quantizer, filled
in parallel Ray tasks.

The driver trains the quantizer (and PQ codebooks) once on the seeded sample, as for one index. Each shard task
gets that trained, empty index, streams the embedding sources and adds the rows whose id hashes to it
(``crc32(id) % N``: an id's shard is known without a lookup), then writes its shard as a complete index version
(index, id sidecar, manifest with checksums) inside the sharded version's temporary directory. Tasks run wherever
Ray places them (each declares the memory of its shard), so a cluster fills shards on several nodes at once; the
sharded version becomes visible only when every shard is written (one rename, then ``CURRENT``).

Each task reads every source and keeps its share: N reads of the embeddings, traded for no shuffle. At 1,280-d
float32 a shard task holds only its own vectors (N-th of the total) plus one chunk.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from lens.cluster import init_ray

__all__ = ["shard_of", "fill_shards"]


def shard_of(ids: list[str], n: int) -> np.ndarray:
    """Each id's shard: CRC-32 of its UTF-8 bytes, modulo ``n`` (stable across builds and machines)."""
    return np.fromiter((zlib.crc32(i.encode()) % n for i in ids), dtype=np.int64, count=len(ids))


def _fill(trained: bytes, uris: list[str], keep: np.ndarray, shard: int, n: int, chunk_rows: int, vtmp: str,
          manifest: dict) -> dict:
    import faiss

    from .source import kept_chunks, open_sources
    from .store import write_version

    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    sources, _ = open_sources(uris)
    ids: list[str] = []
    meta: list[str] = []
    for _, chunk in kept_chunks(sources, keep, chunk_rows):
        mine = np.flatnonzero(shard_of(chunk.ids, n) == shard)
        if len(mine) == 0:
            continue
        part = chunk.take(mine)
        index.add(part.vectors)
        ids += part.ids
        meta += part.metadata
    name = f"shard-{shard:03d}"
    write_version(vtmp, index, ids, meta, manifest | {"shard": shard, "shards": n}, make_current=False, name=name)
    return {"shard": shard, "count": len(ids), "dir": str(Path(vtmp) / name)}


def fill_shards(trained_index, sources, keep: np.ndarray, n: int, chunk_rows: int, vtmp: Path, manifest: dict,
                *, bytes_per_vector: float, address: str | None = None, log=print) -> list[Path]:
    """Fill ``n`` shards of ``trained_index`` in parallel Ray tasks; returns their directories in shard order."""
    import faiss
    import ray

    init_ray(address, log=log, what="lens index build")
    trained = faiss.serialize_index(trained_index).tobytes()
    keep_ref = ray.put(keep)
    per_shard = int(bytes_per_vector * keep.sum() / n)
    task = ray.remote(_fill).options(num_cpus=1, memory=2 * per_shard + (256 << 20), max_retries=2)
    refs = [task.remote(trained, [s.uri for s in sources], keep_ref, s, n, chunk_rows, str(vtmp), manifest)
            for s in range(n)]
    done = []
    while refs:
        ready, refs = ray.wait(refs, num_returns=1)
        r = ray.get(ready[0])
        done.append(r)
        log(f"lens index: shard {r['shard']} written ({r['count']:,} vectors); {len(done)}/{n} shards")
    return [Path(r["dir"]) for r in sorted(done, key=lambda r: r["shard"])]
