"""Drift of a model's inputs, seen through its outputs: a reference profile and two-sample tests against it.

**Profile** (:class:`Profile`): fitted on embeddings the model produced on known-good data (``lens embed``
writes one next to its output, ``lens index build`` next to each index version, ``lens drift profile`` from any
embeddings): a PCA projection (``components`` dimensions), a sample of the reference projected on it (at most
``max_reference`` rows, seeded), and the reference's top-1 class counts. It records the model identity: a
profile only judges embeddings of a comparable model.

**Test** (:func:`compare`), chosen for bounded cost and honest p-values on windows of 500-1,000 images:

* embeddings: a two-sample Kolmogorov-Smirnov test per PCA component (window against the *reference sample*,
  so both samples' variability counts: testing against reference statistics as if they were the population is
  the trap that flags drift constantly), Bonferroni-corrected over the components. KS costs O((n + m) log(n + m))
  per component and no more memory than the two samples; MMD with a permutation test would need the (n + m)^2
  kernel matrix and hundreds of permutations per evaluation;
* classes: a chi-square test of homogeneity on the 2 x K table of top-1 counts (window vs reference sample;
  classes expected fewer than 5 times pooled into one), plus the population stability index as its size;
* overall: Bonferroni over the two tests. Drift is declared when the overall p-value is below ``alpha`` **and** an
  effect size passes its floor (largest KS distance >= ``min_ks`` or PSI >= ``min_psi``): with large windows a
  negligible shift is "significant", so a size is required too.

**Monitor** (:class:`DriftMonitor`): a bounded window (ring buffer) of projected embeddings and top-1 classes,
fed per image (a 32 x D product), evaluated every ``every`` new images off the request path.
"""

from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass, field

import numpy as np

from lens.identity import ModelIdentity, identity_of

__all__ = ["Profile", "DriftResult", "compare", "ks_2samp", "chi2_homogeneity", "psi", "DriftMonitor",
           "PROFILE_FILE", "sample_embeddings", "profile_of"]

#: The file name of a profile next to embeddings or an index version.
PROFILE_FILE = "drift-profile.npz"
OTHER = "\x00other"


# -- statistics ------------------------------------------------------------------------------------
def ks_2samp(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample KS statistic D and its asymptotic p-value (``scipy.stats.ks_2samp``, ``method="asymp"``: windows
    are hundreds of rows, where the exact method costs O(n m) for no better decision)."""
    from scipy import stats

    r = stats.ks_2samp(np.asarray(a, np.float64), np.asarray(b, np.float64), method="asymp")
    return float(r.statistic), float(r.pvalue)


def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for a chi-square variable with ``df`` degrees of freedom (1.0 for df 0)."""
    from scipy import stats

    return float(stats.chi2.sf(x, df)) if df > 0 else 1.0


def _pooled_counts(ref: dict, cur: dict) -> tuple[np.ndarray, np.ndarray, list]:
    """Counts of both samples over the union of classes, those expected < 5 times pooled into one."""
    n_ref, n_cur = sum(ref.values()), sum(cur.values())
    keys = sorted(set(ref) | set(cur))
    r = np.array([ref.get(k, 0) for k in keys], np.float64)
    c = np.array([cur.get(k, 0) for k in keys], np.float64)
    total = r + c
    small = total * min(n_ref, n_cur) / max(n_ref + n_cur, 1) < 5
    if small.any():
        r = np.append(r[~small], r[small].sum())
        c = np.append(c[~small], c[small].sum())
        keys = [k for k, s in zip(keys, small) if not s] + [OTHER]
        if r[-1] + c[-1] == 0:
            r, c, keys = r[:-1], c[:-1], keys[:-1]
    return r, c, keys


def chi2_homogeneity(ref: dict, cur: dict) -> tuple[float, float, int]:
    """Chi-square test that two samples of class labels come from one distribution: (statistic, p, df), by
    ``scipy.stats.chi2_contingency`` on the 2 x K table (no continuity correction; rare classes pooled first)."""
    from scipy import stats

    r, c, _ = _pooled_counts(ref, cur)
    keep = (r + c) > 0
    r, c = r[keep], c[keep]
    if len(r) < 2 or r.sum() == 0 or c.sum() == 0:
        return 0.0, 1.0, 0
    res = stats.chi2_contingency(np.stack([r, c]), correction=False)
    return float(res.statistic), float(res.pvalue), int(res.dof)


def psi(ref: dict, cur: dict, eps: float = 1e-4) -> float:
    """Population stability index of the class distribution (0.1: moderate shift, 0.25: large)."""
    r, c, _ = _pooled_counts(ref, cur)
    if r.sum() == 0 or c.sum() == 0:
        return 0.0
    p, q = np.maximum(r / r.sum(), eps), np.maximum(c / c.sum(), eps)
    return float(((q - p) * np.log(q / p)).sum())


# -- the profile -----------------------------------------------------------------------------------
@dataclass
class Profile:
    mean: np.ndarray  # (D,)
    components: np.ndarray  # (k, D), rows orthonormal
    reference: np.ndarray  # (R, k) the reference sample, projected
    classes: dict  # top-1 label -> count in the reference sample
    identity: dict | None = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def fit(cls, embeddings: np.ndarray, top1: list[str] | None = None, *, components: int = 32,
            max_reference: int = 5000, seed: int = 0, identity: ModelIdentity | dict | None = None,
            source: str | None = None) -> "Profile":
        x = np.asarray(embeddings, np.float32)
        if x.ndim != 2 or len(x) < 2 * components:
            raise ValueError(f"a drift profile needs at least {2 * components} embeddings (2 per component), "
                             f"got {len(x)}")
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(x), size=min(len(x), max_reference), replace=False))
        x = x[keep]
        labels = [top1[i] for i in keep] if top1 is not None else []
        mean = x.mean(0)
        # The top-k principal axes from the (D, D) scatter matrix, solving for those k eigenpairs only: the same
        # axes as a full SVD of the rows (to 1e-8) at a quarter of its time (0.29 vs 1.14 s at 3,000 x 1280),
        # which `lens embed` pays at the end of every job.
        from scipy import linalg

        xc = (x - mean).astype(np.float64)
        scatter = xc.T @ xc
        k = min(components, x.shape[1])
        values, vectors = linalg.eigh(scatter, subset_by_index=[x.shape[1] - k, x.shape[1] - 1])
        comps = vectors[:, ::-1].T.astype(np.float32)  # largest first
        ident = identity.to_dict() if isinstance(identity, ModelIdentity) else identity
        explained = float(np.clip(values, 0, None).sum() / max(float(np.trace(scatter)), 1e-12))
        counts: dict = {}
        for label in labels:
            counts[label] = counts.get(label, 0) + 1
        return cls(mean=mean, components=comps, reference=((x - mean) @ comps.T).astype(np.float32),
                   classes=counts, identity=ident,
                   meta={"rows": int(len(embeddings)), "reference_rows": int(len(x)), "components": int(k),
                         "explained_variance": round(explained, 4), "source": source, "seed": seed})

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        return ((np.asarray(embeddings, np.float32) - self.mean) @ self.components.T).astype(np.float32)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        header = json.dumps({"format": "lens-drift-profile/1", "classes": self.classes,
                             "model_identity": self.identity, "meta": self.meta})
        np.savez_compressed(buf, mean=self.mean, components=self.components, reference=self.reference,
                            header=np.frombuffer(header.encode(), np.uint8))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "profile") -> "Profile":
        try:
            z = np.load(io.BytesIO(data), allow_pickle=False)
            header = json.loads(bytes(z["header"]).decode())
            if header.get("format") != "lens-drift-profile/1":
                raise ValueError(f"format {header.get('format')!r}")
            return cls(mean=z["mean"], components=z["components"], reference=z["reference"],
                       classes=dict(header["classes"]), identity=identity_of(header), meta=header.get("meta", {}))
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same error to the user
            raise ValueError(f"{where} is not a Lens drift profile: {e}") from None

    def save(self, uri: str) -> str:
        from lens.storage import Location

        loc = Location.parse(uri.rsplit("/", 1)[0] if "/" in uri else ".")
        path = loc.path(uri.rsplit("/", 1)[-1])
        loc.write_bytes(path, self.to_bytes())
        return loc.uri_of(path)

    @classmethod
    def load(cls, uri: str) -> "Profile":
        from lens.storage import Location

        parent, _, name = str(uri).rpartition("/")
        loc = Location.parse(parent or ".")
        path = loc.path(name)
        if loc.exists(loc.path(name, PROFILE_FILE)):  # a directory holding one
            path = loc.path(name, PROFILE_FILE)
        try:
            return cls.from_bytes(loc.read_bytes(path), where=str(uri))
        except OSError:  # absent, or a directory without one
            raise ValueError(f"no drift profile at {uri} (expected a {PROFILE_FILE} file or a directory holding "
                             "one; make it with `lens drift profile`)") from None


@dataclass
class DriftResult:
    drift: bool
    p_value: float  # overall (Bonferroni over the embedding and class tests)
    p_embedding: float
    p_classes: float
    ks_max: float  # largest per-component KS distance
    psi: float
    window: int
    components: list  # per component: (D, p) of the most shifted five
    chi2: float

    def to_dict(self) -> dict:
        return {"drift": self.drift, "p_value": self.p_value, "p_embedding": self.p_embedding,
                "p_classes": self.p_classes, "ks_max": round(self.ks_max, 4), "psi": round(self.psi, 4),
                "chi2": round(self.chi2, 3), "window": self.window, "most_shifted_components": self.components}


def compare(profile: Profile, projected: np.ndarray, top1: list[str] | None = None, *, alpha: float = 0.01,
            min_ks: float = 0.1, min_psi: float = 0.1) -> DriftResult:
    """Test a window (already projected with ``profile.project``) against the profile's reference sample."""
    y = np.asarray(projected, np.float32)
    k = profile.reference.shape[1]
    stats = [ks_2samp(profile.reference[:, j], y[:, j]) for j in range(k)]
    ds = np.array([d for d, _ in stats])
    ps = np.array([p for _, p in stats])
    p_emb = float(min(1.0, ps.min() * k))
    cur: dict = {}
    for label in top1 or []:
        cur[label] = cur.get(label, 0) + 1
    if profile.classes and cur:
        chi, p_cls, _ = chi2_homogeneity(profile.classes, cur)
        size = psi(profile.classes, cur)
    else:
        chi, p_cls, size = 0.0, 1.0, 0.0
    p = float(min(1.0, 2 * min(p_emb, p_cls)))
    big = bool((p_emb * 2 < alpha and ds.max() >= min_ks) or (p_cls * 2 < alpha and size >= min_psi))
    order = np.argsort(-ds)[:5]
    return DriftResult(drift=bool(p < alpha and big), p_value=p, p_embedding=p_emb, p_classes=float(p_cls),
                       ks_max=float(ds.max()), psi=size, window=len(y),
                       components=[[int(j), round(float(ds[j]), 4), float(ps[j])] for j in order], chi2=chi)


# -- online --------------------------------------------------------------------------------------------
class DriftMonitor:
    """A bounded window of recent projected embeddings and top-1 classes; thread-safe ``add`` and ``evaluate``."""

    def __init__(self, profile: Profile, *, window: int = 500, every: int = 250, alpha: float = 0.01,
                 min_ks: float = 0.1, min_psi: float = 0.1) -> None:
        if window < 50:
            raise ValueError(f"a drift window needs at least 50 images, got {window}")
        self.profile, self.window, self.every = profile, window, every
        self.alpha, self.min_ks, self.min_psi = alpha, min_ks, min_psi
        self._buf = np.zeros((window, profile.components.shape[0]), np.float32)
        self._labels: list = [None] * window
        self._n = 0  # images seen
        self._since = 0  # images since the last evaluation
        self._lock = threading.Lock()
        self.last: DriftResult | None = None

    def add(self, embedding: np.ndarray, top1: str | None) -> None:
        row = self.profile.project(embedding[None])[0]
        with self._lock:
            i = self._n % self.window
            self._buf[i] = row
            self._labels[i] = top1
            self._n += 1
            self._since += 1

    @property
    def filled(self) -> int:
        return min(self._n, self.window)

    def due(self) -> bool:
        return self._n >= self.window and self._since >= self.every

    def evaluate(self) -> DriftResult | None:
        """Test the current window if it is full and ``every`` images arrived since the last test."""
        with self._lock:
            if not self.due():
                return None
            x, labels = self._buf.copy(), [lab for lab in self._labels if lab is not None]
            self._since = 0
        self.last = compare(self.profile, x, labels, alpha=self.alpha, min_ks=self.min_ks, min_psi=self.min_psi)
        return self.last


# -- reading embeddings ------------------------------------------------------------------------------
def sample_embeddings(uri: str, max_rows: int = 5000, seed: int = 0) -> tuple[np.ndarray, list[str], dict | None]:
    """A uniform sample (at most ``max_rows``) of the embeddings under ``uri`` (a ``lens embed`` output, event
    embedding parts, or one Parquet file): (vectors, top-1 labels, model identity)."""
    import pyarrow.parquet as pq

    from lens.identity import LEGACY_PARQUET_KEY, PARQUET_KEY
    from lens.storage import Location

    loc = Location.parse(uri)
    manifest = None if str(uri).endswith(".parquet") else loc.read_json(loc.path("manifest.json"))
    if manifest is not None:
        files, identity = [loc.path(f) for f in manifest["files"]], identity_of(manifest)
    else:
        files, identity = [f for f in loc.list_files() if f.endswith(".parquet")], None
    if not files:
        from lens.errors import ConfigError

        raise ConfigError(f"no embedding parts under {uri}")
    counts = []
    for f in files:
        with loc.fs.open_input_file(f) as fh:
            pf = pq.ParquetFile(fh)
            counts.append(pf.metadata.num_rows)
            if identity is None:
                meta = pf.schema_arrow.metadata or {}
                raw = meta.get(PARQUET_KEY) or meta.get(LEGACY_PARQUET_KEY)
                identity = ModelIdentity.from_dict(json.loads(raw)).to_dict() if raw else None
    total = sum(counts)
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(total, size=min(total, max_rows), replace=False).tolist())
    vecs, labels, start = [], [], 0
    for f, n in zip(files, counts):
        rows = sorted(i - start for i in chosen if start <= i < start + n)
        start += n
        if not rows:
            continue
        with loc.fs.open_input_file(f) as fh:
            names = pq.ParquetFile(fh).schema_arrow.names
            cols = [c for c in ("embedding", "tags", "top1") if c in names]
            if "embedding" not in cols:
                raise ValueError(f"{loc.uri_of(f)} has no embedding column: not an embedding part")
            t = pq.read_table(fh, columns=cols).take(rows)
        emb = t.column("embedding").combine_chunks()
        flat = emb.values if hasattr(emb, "values") else emb.flatten()
        vecs.append(np.asarray(flat.to_numpy(zero_copy_only=False), np.float32).reshape(len(rows), -1))
        if "tags" in cols:
            labels += [(tg[0]["label"] if tg else "") for tg in t.column("tags").to_pylist()]
        elif "top1" in cols:
            labels += [x or "" for x in t.column("top1").to_pylist()]
    return np.concatenate(vecs), labels, identity


def profile_of(uri: str | list[str], *, max_rows: int = 5000, seed: int = 0, components: int = 32) -> Profile:
    """A reference profile of the embeddings under ``uri`` (or several locations of one model, sampled alike)."""
    uris = [uri] if isinstance(uri, str) else list(uri)
    parts = [sample_embeddings(u, max_rows=max(1, max_rows // len(uris)), seed=seed) for u in uris]
    vecs = np.concatenate([p[0] for p in parts])
    labels = [lab for p in parts for lab in p[1]] if all(len(p[1]) == len(p[0]) for p in parts) else []
    identity = parts[0][2]
    return Profile.fit(vecs, labels if len(labels) == len(vecs) else None, components=components,
                       max_reference=max_rows, seed=seed, identity=identity, source=str(uri))
