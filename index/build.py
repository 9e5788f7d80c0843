"""``lens index build``: choose, train, fill and tune a FAISS index from embedding shards, with bounded memory.

Cosine similarity on L2-normalised vectors = inner product (``METRIC_INNER_PRODUCT``). Vectors stream from
Parquet in chunks: pass 1 reads only ids (count, de-duplicate: the last occurrence of an id wins, so event
embeddings newer than the bulk run replace them), pass 2 gathers a seeded training sample and the held-out
tuning queries, pass 3 adds vectors chunk by chunk while computing the queries' exact top-k alongside.
The search parameter (``nprobe`` / ``efSearch``) is then tuned to the lowest value that reaches the target
recall@k against exact search, and the achieved recall is recorded in the manifest.
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from lens import __version__
from lens.cluster import absolute
from lens.errors import ConfigError
from lens.identity import COMPAT_KEY, ModelIdentity, precision_compat
from lens.runtime.config import StrictModel

from lens.tombstones import Tombstones

from .source import deletions_in, kept_chunks, open_sources
from .store import search_params, write_version

__all__ = ["BuildConfig", "IndexPlan", "choose_index", "build_index", "parse_bytes", "bytes_per_vector",
           "recall_at_k"]

logger = logging.getLogger(__name__)

IndexKind = Literal["auto", "flat", "hnsw", "ivf-flat", "ivf-pq"]
RefineKind = Literal["auto", "none", "fp16", "sq8", "sq6", "sq4"]

#: bytes per dimension of each re-ranking code (FAISS scalar quantizers), finest first
REFINE_BYTES_PER_DIM = {"fp16": 2.0, "sq8": 1.0, "sq6": 0.75, "sq4": 0.5}
REFINE_FACTORY = {"fp16": "SQfp16", "sq8": "SQ8", "sq6": "SQ6", "sq4": "SQ4"}
#: what ``refine: auto`` considers: SQ4 re-ranking stayed well under the recall target (0.913 at 200k x 1280 where
#: SQ6 reached 0.978, and below PQ alone on 32-d data), so it is only there when asked for by name
AUTO_REFINE = ("fp16", "sq8", "sq6")
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(v: str | int | float) -> int:
    """``4GB``, ``512MiB``, ``1e9`` -> bytes."""
    if isinstance(v, (int, float)):
        return int(v)
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(v))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {v!r} (examples: 4GB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class BuildConfig(StrictModel):
    embeddings: tuple[str, ...] = Field(..., min_length=1, description="lens embed outputs and/or event "
                                        "embedding prefixes (local or s3://)")
    output: str = Field(..., description="index root directory; each build adds a version and points CURRENT at it")
    index: IndexKind = Field("auto", description="auto (chosen from N, dim, memory_budget and target_recall), "
                             "flat, hnsw, ivf-flat or ivf-pq")
    memory_budget: int = Field(4 * 10**9, description="bytes the index may take in memory (auto choice)")
    target_recall: float = Field(0.95, gt=0, le=1, description="recall@k the tuned search parameter must reach")
    k: int = Field(10, ge=1, le=1000, description="k of the recall target")
    queries: int = Field(500, ge=10, description="held-out queries for tuning and measuring recall")
    train_size: int | None = Field(None, description="training sample; default 40 x nlist (capped by N; FAISS wants >= 39)")
    kmeans_iterations: int = Field(10, ge=1, le=100, description="k-means iterations of IVF training")
    chunk_rows: int = Field(50_000, ge=1000, description="rows per chunk streamed from Parquet")
    hnsw_m: int = Field(32, ge=4, le=128, description="hnsw: links per vector (more = better recall, more memory)")
    opq: bool = Field(False, description="ivf-pq: learn an OPQ rotation first (better recall; training takes "
                      "minutes on 1280-dim vectors)")
    refine: RefineKind = Field(
        "auto", description="ivf-pq: re-rank PQ's candidates with finer scalar-quantized codes held beside them "
        "(FAISS IndexRefine): auto = the finest of fp16, sq8, sq6 that fits the memory budget beside PQ codes "
        "of dim/20 to dim/10 bytes, else none; none = PQ's scores only (recall capped by its compression). "
        "--index ivf-pq by name keeps codes within 1/4 of the full vectors")
    refine_k_factor: int = Field(16, ge=1, le=1000, description="ivf-pq with refine: PQ candidates re-ranked per "
                                 "result (k x this)")
    flat_below: int = Field(20_000, description="auto: exact Flat below this many vectors")
    prefer: Literal["ivf-flat", "hnsw"] = Field(
        "ivf-flat", description="auto, where full vectors fit the budget: the type to build. IVF-Flat measured faster "
        "than HNSW32 at the same held-out recall on both benchmark sets (scripts/bench_index.py: 100k synthetic, "
        "3,548 vs 1,994 q/s at batch 1 and recall 0.994 vs 0.909; real Lite0 embeddings 24,105 vs 19,007), builds "
        "2x faster and takes less memory; hnsw if your own run says otherwise")
    seed: int = Field(0, description="seeds the training sample, held-out queries and k-means")
    threads: int | None = Field(None, description="FAISS threads (default: all cores)")
    shards: int = Field(1, ge=1, le=1024, description="IVF shards sharing one coarse quantizer, filled in parallel "
                        "Ray tasks and searched as one (scatter-gather); 1 = one index")
    address: str | None = Field(None, description="Ray cluster for --shards > 1 (default: RAY_ADDRESS or a local Ray)")
    int8_compat: bool = Field(False, description="an index of fp32 embeddings: also measure whether int8 queries and "
                              "int8 delta rows may meet it (the int8 model's accuracy gate: recall@10 of its "
                              "queries against fp32 vectors on held-out images), recorded in the manifest; without "
                              "it such an index refuses them (409). An int8 index always records its own gate's "
                              "figure for fp32 queries")
    weights: str | None = Field(None, description="int8_compat: the rows' model weights when not the embedded ones")
    calibration: str | None = Field(None, description="int8_compat: the int8 model's calibration images (as "
                                    "model.calibration; default the bundled set)")
    int8_holdout: str | None = Field(None, description="int8_compat: the gate's held-out images (as "
                                     "model.int8_holdout)")
    cache_dir: str | None = Field(None, description="int8_compat: model cache (default $LENS_CACHE_DIR)")

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _bytes(cls, v):
        return parse_bytes(v)


class IndexPlan(StrictModel):
    type: Literal["flat", "hnsw", "ivf-flat", "ivf-pq"]
    factory: str
    nlist: int | None = None
    pq_m: int | None = None
    refine: Literal["fp16", "sq8", "sq6", "sq4"] | None = None
    k_factor: int | None = None
    bytes_per_vector: float
    reason: str


def refine_bytes(refine: str | None, dim: int) -> int:
    """Bytes per vector of a re-ranking code (0 without one)."""
    return math.ceil(REFINE_BYTES_PER_DIM[refine] * dim) if refine else 0


def bytes_per_vector(kind: str, dim: int, *, hnsw_m: int = 32, pq_m: int = 0, refine: str | None = None) -> float:
    """What one vector costs in memory for each index type (vectors, graph links, ids, codes, re-ranking codes)."""
    return {"flat": 4 * dim, "hnsw": 4 * dim + 2 * hnsw_m * 4 * 1.05, "ivf-flat": 4 * dim + 8,
            "ivf-pq": pq_m + 8 + refine_bytes(refine, dim)}[kind]


def _nlist(n: int) -> int:
    """4·√N, the low end of autofaiss's 4–16·√N band (k-means training cost grows with nlist; the tuned nprobe
    recovers recall), and at most N/32 so every centroid gets enough training points."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // 32, 65536)))


def _pq_m(dim: int, budget_per_vector: float) -> int | None:
    """The largest PQ code size (bytes) that fits, among divisors of ``dim`` that FAISS handles well."""
    for m in (640, 512, 384, 320, 256, 192, 160, 128, 96, 64, 48, 32, 16, 8):
        if dim % m == 0 and m + 8 <= budget_per_vector and dim // m >= 2:
            return m
    return None


def _pq_and_refine(dim: int, per: float, refine: str, *, compact: bool) -> tuple[int | None, str | None]:
    """(PQ code bytes, re-ranking code) within ``per`` bytes per vector. With re-ranking, PQ only has to bring the
    true neighbours into the ``k x k_factor`` candidates: its code is capped at dim / 10 bytes (a smaller code scans
    faster; measured: PQ128 + SQ6 re-ranking reached SQ6's recall at 4x PQ256's q/s) and ``auto`` takes the finest
    re-ranking code of :data:`AUTO_REFINE` that leaves room for PQ codes of at least dim / 20 bytes; none fits: PQ
    alone, as large as fits. ``compact`` (``--index ivf-pq`` asked by name, whatever the budget): ``auto`` stays within 1/4 of the full
    vectors."""
    if refine == "none":
        return _pq_m(dim, per), None
    cap = max(dim // 10, 8) + 8
    if refine != "auto":
        return _pq_m(dim, min(per - refine_bytes(refine, dim), cap)), refine
    if compact:
        per = min(per, dim)
    for codec in AUTO_REFINE:
        m = _pq_m(dim, min(per - refine_bytes(codec, dim), cap))
        if m is not None and m >= max(dim // 20, 8):
            return m, codec
    return _pq_m(dim, per), None


def choose_index(n: int, dim: int, cfg: BuildConfig) -> IndexPlan:
    """Pick the index, autofaiss-style: exact Flat when small, HNSW when it fits, IVF-Flat, then OPQ+IVF-PQ."""
    budget = cfg.memory_budget
    per = budget / max(n, 1)
    nlist = _nlist(n)
    # what every IVF index holds whatever N (the coarse centroids; PQ's codebooks too): off the budget first
    per_ivf = (budget - 4 * nlist * dim) / max(n, 1)
    per_pq = per_ivf - 4 * 256 * dim / max(n, 1)
    kind = cfg.index
    reason = f"asked for {kind}"
    if kind == "auto":
        if n < cfg.flat_below and bytes_per_vector("flat", dim) <= per:
            kind, reason = "flat", f"{n} vectors < {cfg.flat_below}: exact search is fast enough"
        elif (cfg.prefer == "hnsw" and bytes_per_vector("hnsw", dim, hnsw_m=cfg.hnsw_m) <= per
              and n <= 5_000_000):
            kind, reason = "hnsw", "vectors and graph fit the memory budget (prefer: hnsw)"
        elif bytes_per_vector("ivf-flat", dim) <= per_ivf:
            kind, reason = "ivf-flat", ("full vectors fit the memory budget; IVF-Flat measured faster than HNSW at the "
                                        "same recall (prefer)")
        else:
            kind, reason = "ivf-pq", "full vectors do not fit the memory budget: compressed codes"
    if kind == "flat":
        return IndexPlan(type="flat", factory="Flat", bytes_per_vector=bytes_per_vector("flat", dim), reason=reason)
    if kind == "hnsw":
        return IndexPlan(type="hnsw", factory=f"HNSW{cfg.hnsw_m},Flat",
                         bytes_per_vector=bytes_per_vector("hnsw", dim, hnsw_m=cfg.hnsw_m), reason=reason)
    if kind == "ivf-flat":
        return IndexPlan(type="ivf-flat", factory=f"IVF{nlist},Flat", nlist=nlist,
                         bytes_per_vector=bytes_per_vector("ivf-flat", dim), reason=reason)
    m, refine = _pq_and_refine(dim, per_pq if cfg.index == "auto" else max(per_pq, 72), cfg.refine,
                               compact=cfg.index != "auto")
    if m is None:
        need = f" beside {cfg.refine} re-ranking codes ({refine_bytes(cfg.refine, dim)} bytes)" if refine else ""
        raise ConfigError(f"{n} vectors of dimension {dim} do not fit in {budget} bytes even as 8-byte PQ codes{need}")
    factory = f"IVF{nlist},PQ{m}x8"
    if cfg.opq:
        # OPQ rotates the space so PQ's sub-vectors carry equal information (better recall, slower training)
        d_out = min(dim, 4 * m)
        d_out -= d_out % m
        factory = f"OPQ{m}_{d_out},{factory}"
    if refine:
        # PQ finds k x k_factor candidates, the finer codes re-rank them (FAISS IndexRefine)
        factory += f",Refine({REFINE_FACTORY[refine]})"
        reason += f"; {refine} re-ranking of {cfg.refine_k_factor}x candidates"
    return IndexPlan(type="ivf-pq", factory=factory, nlist=nlist, pq_m=m, refine=refine,
                     k_factor=cfg.refine_k_factor if refine else None,
                     bytes_per_vector=bytes_per_vector("ivf-pq", dim, pq_m=m, refine=refine), reason=reason)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found ∩ truth| / k over queries (both (q, k) arrays of ids; -1 = no result)."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / k for f, t in zip(found, truth)]))


def _merge_topk(scores: np.ndarray, ids: np.ndarray, new_scores: np.ndarray, new_ids: np.ndarray, k: int):
    s = np.concatenate([scores, new_scores], axis=1)
    i = np.concatenate([ids, new_ids], axis=1)
    top = np.argpartition(-s, min(k, s.shape[1] - 1), axis=1)[:, :k]
    return np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)


def _without_self(found: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row's ids, best first, without the query's own row, cut to ``k``."""
    out = np.full((len(found), k), -1, np.int64)
    for i, (row, me) in enumerate(zip(found, own)):
        rest = row[row != me][:k]
        out[i, : len(rest)] = rest
    return out


def _tune(index, plan: IndexPlan, queries: np.ndarray, truth: np.ndarray, k: int, target: float,
          own: np.ndarray) -> dict:
    def search(params=None) -> np.ndarray:
        return _without_self(index.search(queries, k + 1, params=params)[1], own, k)

    if plan.type == "flat":
        found = search()
        return {"param": None, "value": None, "recall": round(recall_at_k(found, truth), 4), "curve": []}
    if plan.type == "hnsw":
        name, grid = "efSearch", [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
        grid = [g for g in grid if g >= k]
    else:
        name, grid = "nprobe", [v for v in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512,
                                            1024, 2048) if v <= plan.nlist] or [plan.nlist]
    curve, best = [], None
    for v in grid:
        t0 = time.perf_counter()
        found = search(search_params(plan.type, v, k_factor=plan.k_factor))
        dt = time.perf_counter() - t0
        r = recall_at_k(found, truth)
        curve.append({"value": v, "recall": round(r, 4), "ms_per_query": round(1000 * dt / len(queries), 3)})
        if best is None or r > best[1] + 1e-9:
            best = (v, r)
        if r >= target:
            return {"param": name, "value": v, "recall": round(r, 4), "target_reached": True, "curve": curve}
    logger.warning("recall target %.3f not reached; best %s=%s gives %.3f", target, name, best[0], best[1])
    return {"param": name, "value": best[0], "recall": round(best[1], 4), "target_reached": False, "curve": curve}


def _one_query_ms(index, plan: IndexPlan, queries: np.ndarray, k: int, value, n: int = 100) -> dict:
    """One query at a time at the tuned parameter (what a request waits for; autofaiss's speed figures): the mean
    and 99th percentile over up to ``n`` held-out queries, in ms."""
    params = search_params(plan.type, value, k_factor=plan.k_factor) if value is not None else None
    times = []
    for q in queries[:n]:
        t0 = time.perf_counter()
        index.search(q[None], k, params=params)
        times.append(1000 * (time.perf_counter() - t0))
    return {"avg": round(float(np.mean(times)), 4), "p99": round(float(np.quantile(times, 0.99)), 4),
            "queries": len(times)}


def _int8_model_of(rows: ModelIdentity, cfg: BuildConfig, log) -> ModelIdentity:
    """The int8 model of the rows' own model (quantized and judged once per cache, like serving's), whose gate
    measured its queries against fp32 vectors."""
    from lens.runtime.loading import config_for_identity, load_model

    if rows.space() == "int8":
        raise ConfigError("int8_compat measures int8 queries against an fp32 index; these rows are int8 already "
                          "(their own gate's figure is recorded)")
    overrides = {k: v for k, v in (("weights", cfg.weights), ("calibration", cfg.calibration),
                                   ("int8_holdout", cfg.int8_holdout), ("cache_dir", cfg.cache_dir)) if v}
    log("lens index: measuring int8 queries against these fp32 rows (the int8 model's accuracy gate) ...")
    model = load_model(config_for_identity(rows, **overrides).model_copy(
        update={"backend": "openvino", "device": "cpu", "precision": "int8"}))
    got = model.identity()
    if got.mismatch(rows):
        raise ConfigError(f"the model loaded for int8_compat differs from the rows' in {', '.join(got.mismatch(rows))}"
                          "; give the rows' weights (--weights)")
    if got.space() != "int8":
        q = model.quantization or {}
        raise ConfigError(f"the int8 model of {rows.model} was refused by its accuracy gate ({', '.join(q.get('failed', []))}"
                          "); int8 queries cannot meet this index")
    return got


def build_index(cfg: BuildConfig, log=logger.info) -> dict:
    """Build, tune and persist a new index version; returns its manifest."""
    import faiss

    if cfg.threads:
        faiss.omp_set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    # local paths absolute before a Ray task (--shards) sees them: a joined cluster's workers work elsewhere
    cfg = cfg.model_copy(update={"embeddings": tuple(absolute(e) for e in cfg.embeddings),
                                 "output": absolute(cfg.output)})
    sources, ident = open_sources(list(cfg.embeddings))
    dim = ident.embed_dim
    compat = precision_compat(ident, _int8_model_of(ident, cfg, log) if cfg.int8_compat else None)

    # pass 1: ids (and the event rows' sequencers) only -> which global positions are kept: per id the row of the
    # newest event (the last occurrence among equals, so event embeddings newer than the bulk run replace them),
    # unless a tombstone hides it (lens.tombstones)
    tombstones = Tombstones()
    tombstones.add(deletions_in(list(cfg.embeddings), cfg.output))
    last: dict[str, tuple[int, float | int]] = {}
    pos = invalid = 0
    for src in sources:
        for ids, seqs in src.keys():
            for i, q in zip(ids, seqs):
                if i is None:  # a null or empty id: never indexed (its position stays unkept)
                    invalid += 1
                elif i not in last or q >= last[i][1]:
                    last[i] = (pos, q)
                pos += 1
    total = pos
    deleted = [i for i, (_, q) in last.items() if tombstones.hides(i, q)]
    for i in deleted:
        del last[i]
    keep = np.zeros(total, dtype=bool)
    keep[np.fromiter((p for p, _ in last.values()), dtype=np.int64, count=len(last))] = True
    n = int(keep.sum())
    if n == 0:
        raise ConfigError("the embeddings hold no rows" + (f" that are not deleted ({len(deleted)} deleted)"
                                                           if deleted else ""))
    del last
    plan = choose_index(n, dim, cfg)
    sharded = cfg.shards > 1
    if sharded and plan.type not in ("ivf-flat", "ivf-pq"):
        if cfg.index != "auto":
            raise ConfigError(f"--shards {cfg.shards} needs an IVF index (one coarse quantizer shared by the shards): "
                              f"--index ivf-flat or ivf-pq, not {cfg.index}")
        fits = bytes_per_vector("ivf-flat", dim) <= cfg.memory_budget / n
        plan = choose_index(n, dim, cfg.model_copy(update={"index": "ivf-flat" if fits else "ivf-pq"}))
        plan = plan.model_copy(update={"reason": f"{cfg.shards} shards need one IVF quantizer; {plan.reason}"})
    if invalid:
        log(f"lens index: {invalid} rows with a null or empty id dropped")
    if deleted:
        log(f"lens index: {len(deleted)} deleted ids dropped ({len(tombstones)} tombstones)")
    log(f"lens index: {n} vectors of dim {dim} ({total - n - invalid - len(deleted)} superseded rows dropped); {plan.type}: {plan.factory} "
        f"({plan.reason})")

    # pass 2: seeded training sample and held-out tuning queries, by rank among kept rows
    rng = np.random.default_rng(cfg.seed)
    needs_training = plan.type in ("ivf-flat", "ivf-pq")
    train_n = min(n, cfg.train_size or (40 * plan.nlist if needs_training else 0))
    if plan.type == "ivf-pq":
        train_n = min(n, max(train_n, 256 * 39))  # PQ's 256 centroids per sub-quantizer want ~10k points
    q_n = min(cfg.queries, n)
    train_rank = np.sort(rng.choice(n, train_n, replace=False)) if train_n else np.zeros(0, np.int64)
    query_rank = np.sort(rng.choice(n, q_n, replace=False))
    train = np.empty((train_n, dim), np.float32)
    queries = np.empty((q_n, dim), np.float32)
    t0 = time.perf_counter()
    for rank0, chunk in kept_chunks(sources, keep, cfg.chunk_rows):
        hi = rank0 + len(chunk.ids)
        for sel, dst in ((train_rank, train), (query_rank, queries)):
            a, b = np.searchsorted(sel, [rank0, hi])
            if b > a:
                dst[a:b] = chunk.vectors[sel[a:b] - rank0]
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    log(f"lens index: pass 2/3 read {train_n:,} training and {q_n:,} held-out query vectors in "
        f"{time.perf_counter() - t0:.1f} s")
    if needs_training:
        log(f"lens index: training {plan.factory} on {train_n:,} vectors ...")
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.cp.niter = cfg.kmeans_iterations
        if plan.type == "ivf-pq":
            ivf.pq.cp.niter = cfg.kmeans_iterations
            ivf.do_polysemous_training = False  # Hamming-filter training: minutes on 1280 dims, unused here
        index.train(train)
    del train
    train_s = time.perf_counter() - t0

    # pass 3: add in chunks, with the exact top-k of the queries computed on the way (brute force, streamed)
    t0 = time.perf_counter()
    ids_out: list[str] = []
    meta_out: list[str] = []
    k = min(cfg.k, n - 1) if n > 1 else 1
    kq = k + 1 if n > 1 else 1  # the queries are stored rows: their own row is dropped from truth and answers
    best_s = np.full((q_n, kq), -np.inf, np.float32)
    best_i = np.full((q_n, kq), -1, np.int64)
    said = time.perf_counter()
    for rank0, chunk in kept_chunks(sources, keep, cfg.chunk_rows):
        if time.perf_counter() - said > 10:  # progress every ~10 s on big builds
            said = time.perf_counter()
            log(f"lens index: pass 3/3 {'read' if sharded else 'added'} {rank0:,}/{n:,} vectors "
                f"({100 * rank0 / n:.0f} %), {rank0 / max(said - t0, 1e-9):,.0f}/s")
        if not sharded:  # sharded: the shard tasks add; this pass only computes the exact answers
            index.add(chunk.vectors)
            ids_out += chunk.ids
            meta_out += chunk.metadata
        s = queries @ chunk.vectors.T
        kk = min(kq, s.shape[1])
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        best_s, best_i = _merge_topk(best_s, best_i, np.take_along_axis(s, top, 1), top + rank0, kq)
    truth = _without_self(best_i[np.arange(q_n)[:, None], np.argsort(-best_s, axis=1)], query_rank, k)
    own = query_rank
    if sharded:
        from .shards import fill_shards
        from .store import ShardedIndex, load_version, new_version_name

        vtmp = Path(cfg.output) / f".{new_version_name()}.tmp"
        vtmp.mkdir(parents=True)
        shard_manifest = {"type": plan.type, "factory": plan.factory, "dim": dim, "nlist": plan.nlist,
                          "pq_m": plan.pq_m, "refine": plan.refine, "model_identity": ident.to_dict(),
                          # a shard searched on its own (a shard deployment) re-ranks as the whole version does
                          "search": {"k_factor": plan.k_factor} if plan.k_factor else {},
                          "metric": "inner_product (cosine on L2-normalised vectors)"}
        shard_dirs = fill_shards(index, sources, keep, cfg.shards, cfg.chunk_rows, vtmp, shard_manifest,
                                 bytes_per_vector=plan.bytes_per_vector, address=cfg.address, log=log)
        shard_versions = [load_version(d, mmap=False, verify=False) for d in shard_dirs]
        index = ShardedIndex([v.index for v in shard_versions])
        row_of = {i: r for r, i in enumerate(i for v in shard_versions for i in v.ids)}
        # the exact answers are stream ranks; the sharded index numbers rows shard after shard
        rank_id = _ids_of_ranks(sources, keep, set(truth.ravel().tolist()) | set(own.tolist()))
        to_row = np.vectorize(lambda r: row_of[rank_id[r]] if r >= 0 else -1, otypes=[np.int64])
        truth, own = to_row(truth), to_row(own)
    add_s = time.perf_counter() - t0
    assert index.ntotal == n and (sharded or len(ids_out) == n)

    tuned = _tune(index, plan, queries, truth, k, cfg.target_recall, own)
    log(f"lens index: tuned {tuned['param'] or '(exact)'}={tuned['value']} -> recall@{k} {tuned['recall']:.3f}")
    speed = _one_query_ms(index, plan, queries, k, tuned["value"])
    manifest = {
        "lens_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "type": plan.type,
        "factory": plan.factory,
        "metric": "inner_product (cosine on L2-normalised vectors)",
        "dim": dim,
        "nlist": plan.nlist,
        "pq_m": plan.pq_m,
        "refine": plan.refine,
        "search": {"param": tuned["param"], "value": tuned["value"]} | (
            {"k_factor": plan.k_factor} if plan.k_factor else {}),
        "recall": {"k": k, "value": tuned["recall"], "target": cfg.target_recall,
                   "target_reached": tuned.get("target_reached", True), "queries": q_n, "curve": tuned["curve"]},
        "search_speed_ms": speed,
        "bytes_per_vector_estimate": plan.bytes_per_vector,
        "reason": plan.reason,
        "model_identity": ident.to_dict(),
        COMPAT_KEY: compat,
        "sources": [{"uri": s.uri, "kind": s.kind, "files": len(s.files)} for s in sources],
        "duplicates_dropped": total - n - invalid - len(deleted),
        "invalid_ids_dropped": invalid,
        "deleted_dropped": len(deleted),
        "tombstones": len(tombstones),
        "timings_s": {"train": round(train_s, 2), "add": round(add_s, 2),
                      "total": round(time.perf_counter() - t_start, 2)},
    }
    extra = {}
    try:  # the drift reference of the embeddings this index holds (serving tests live traffic against it)
        from lens.quality.drift import PROFILE_FILE, profile_of

        extra[PROFILE_FILE] = profile_of([s.uri for s in sources]).to_bytes()
    except ValueError as e:
        log(f"lens index: no drift profile ({e})")
    if sharded:
        from .store import write_sharded_version

        vdir = write_sharded_version(cfg.output, vtmp, shard_dirs, manifest, extra_files=extra)
    else:
        vdir = write_version(cfg.output, index, ids_out, meta_out, manifest, extra_files=extra)
    log(f"lens index: wrote {vdir} and made it CURRENT")
    return {**manifest, "version": vdir.name, "path": str(vdir), "count": n}


def _ids_of_ranks(sources, keep: np.ndarray, ranks: set[int]) -> dict[int, str]:
    """The id of each kept-row rank in ``ranks`` (reading only the id columns)."""
    out: dict[int, str] = {}
    pos = rank = 0
    for src in sources:
        for ids in src.ids():
            for i in ids:
                if keep[pos]:
                    if rank in ranks:
                        out[rank] = i
                    rank += 1
                pos += 1
    return out
