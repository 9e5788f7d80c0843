"""The accuracy gate an int8 model must pass before it serves, and the images it is calibrated and judged on.

The gate runs the int8 and the fp32 model on a held-out sample never used for calibration and compares them:
top-1 agreement, top-5 tag-set overlap (Jaccard), embedding cosine (mean and 5th percentile), recall@10 of int8
queries against an index of fp32 embeddings and of fp32 queries against an index of int8 embeddings (each
relative to queries of the index's own precision: what mixing the two spaces costs; index manifests record it,
:mod:`lens.identity`), and the classes that disagree most. Below any threshold the int8 model is refused with the
numbers.

The held-out sample is the user's (``model.int8_holdout``) or, by default, seeded crops of photographs that never
chose anything in Lens (:func:`lens.runtime.samples.unseen_photo_paths`): the bundled photos chose the int8
recipe, and the gate measured on them read higher (recall@10 0.97 against 0.93-0.96 on the unseen ones).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lens.errors import ConfigError

__all__ = ["GateThresholds", "judge", "rejudge", "calibration_images", "holdout_images", "default_holdout_recipe",
           "digest_of", "DEFAULT_HOLDOUT"]

#: The default held-out set: this many seeded crops, each this share of its photo's area or more
HOLDOUT_N, HOLDOUT_SEED, HOLDOUT_MIN_AREA = 96, 9001, 0.25
#: What the default held-out set is, as reports name it.
DEFAULT_HOLDOUT = (f"{HOLDOUT_N} seeded crops (a quarter of the area or more) of photos that never chose the "
                   "recipe")


@dataclass(frozen=True)
class GateThresholds:
    """Defaults from measurements on Lite0 with the bundled photos (``benchmarks/model.json``, shown in the README's
    Performance section): Lens's recipe passes each with margin on 96 held-out crops (sampling noise about +-0.03
    in top-1 agreement); quantizing every layer, or a broken calibration (all-black images), falls below them."""

    min_top1_agreement: float = 0.85
    min_mean_cosine: float = 0.98
    min_top5_overlap: float = 0.75
    min_recall_at_10: float = 0.93  # int8 queries against an fp32 index, relative to fp32 queries

    def to_dict(self) -> dict:
        return asdict(self)


def digest_of(images: list[bytes]) -> str:
    h = hashlib.sha256()
    for d in sorted(hashlib.sha256(b).hexdigest() for b in images):
        h.update(d.encode())
    return h.hexdigest()


def _photos(half: int):
    from .samples import photo_paths

    return photo_paths()[half::2]


def calibration_images(source: str | None, n: int = 64) -> list[bytes]:
    """Calibration images: the user's (``DIR`` of image files or Parquet with an ``image`` column), or seeded
    augmented copies of half of the bundled photos."""
    if source is None:
        from .samples import augmented_jpegs

        return [b for _, b, _ in augmented_jpegs(n, seed=7001, paths=_photos(0))]
    return read_images(source, n, what="calibration")


def holdout_images(source: str | None, n: int = HOLDOUT_N) -> list[bytes]:
    """The gate's held-out images: the user's (as :func:`calibration_images` reads them, every one of them), or
    seeded crops of photos that never chose anything in Lens (:data:`DEFAULT_HOLDOUT`)."""
    if source is None:
        from .samples import augmented_jpegs, unseen_photo_paths

        return [b for _, b, _ in augmented_jpegs(n, seed=HOLDOUT_SEED, paths=unseen_photo_paths(),
                                                 min_area=HOLDOUT_MIN_AREA)]
    return read_images(source, 0, what="int8 held-out")


def default_holdout_recipe() -> str:
    """Everything that makes the default held-out set (without making it): stored gate reports are keyed by it."""
    from .samples import unseen_photo_paths

    return f"unseen:{HOLDOUT_N}:{HOLDOUT_SEED}:{HOLDOUT_MIN_AREA}:{[p.name for p in unseen_photo_paths()]}:"


def read_images(source: str, n: int, *, what: str) -> list[bytes]:
    """Every image of ``source`` (``DIR`` of image files, a Parquet file, or a folder of Parquet with an ``image``
    column), the first ``n`` when ``n``."""
    p = Path(source).expanduser()
    if not p.exists():
        raise ConfigError(f"{what} set {source} does not exist")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    out: list[bytes] = []
    for f in files:
        if f.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            try:
                t = pq.read_table(f, columns=["image"])
            except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds
                raise ConfigError(f"{what} file {f} is not Parquet with an image column: {e}") from None
            out += [b for b in t.column("image").to_pylist() if b]
        elif f.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"):
            out.append(f.read_bytes())
    if not out:
        raise ConfigError(f"{what} set {source} holds no images (image files or Parquet with an image column)")
    return out[:n] if n else out


def preprocess_all(images: list[bytes], preprocessor, *, what: str) -> np.ndarray:
    """Decode + preprocess every image; a corrupt one is a clear error naming it (calibration must be clean)."""
    out, bad = [], []
    for i, b in enumerate(images):
        try:
            out.append(preprocessor(b))
        except Exception as e:  # noqa: BLE001 - report every undecodable image at once
            bad.append(f"#{i}: {e}")
    if bad:
        raise ConfigError(f"{len(bad)} {what} image(s) could not be decoded ({'; '.join(bad[:3])}); remove them")
    return np.stack(out)


def judge(fp32_run, int8_run, x: np.ndarray, labels: list[str], thresholds: GateThresholds) -> dict:
    """Compare two ``run(batch) -> (logits, features)`` callables on the held-out batch ``x``."""
    lf, ff, li, fi = [], [], [], []
    for i in range(0, len(x), 16):
        a, b = fp32_run(x[i : i + 16]), int8_run(x[i : i + 16])
        lf.append(a[0]), ff.append(a[1]), li.append(b[0]), fi.append(b[1])
    lf, ff, li, fi = (np.concatenate(v).astype(np.float32) for v in (lf, ff, li, fi))
    ef = ff / np.linalg.norm(ff, axis=1, keepdims=True).clip(1e-12)
    ei = fi / np.linalg.norm(fi, axis=1, keepdims=True).clip(1e-12)
    cos = (ef * ei).sum(1)
    t1f, t1i = lf.argmax(1), li.argmax(1)
    top5f, top5i = np.argsort(-lf, 1)[:, :5], np.argsort(-li, 1)[:, :5]
    overlap = np.array([len(set(a) & set(b)) / len(set(a) | set(b)) for a, b in zip(top5f, top5i)])
    k = min(10, len(x) - 1)

    def recall(queries, index):  # against the same index searched with its own precision's queries, self excluded
        own, mixed = index @ index.T, queries @ index.T
        np.fill_diagonal(own, -np.inf)
        np.fill_diagonal(mixed, -np.inf)
        truth, got = np.argsort(-own, 1)[:, :k], np.argsort(-mixed, 1)[:, :k]
        return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, got)]))

    disagree: dict[str, int] = {}
    for a, b in zip(t1f, t1i):
        if a != b:
            disagree[labels[a]] = disagree.get(labels[a], 0) + 1
    numbers = {"images": int(len(x)), "top1_agreement": round(float((t1f == t1i).mean()), 4),
               "top5_overlap": round(float(overlap.mean()), 4), "mean_cosine": round(float(cos.mean()), 5),
               "p5_cosine": round(float(np.percentile(cos, 5)), 5),
               "recall_at_10_vs_fp32_index": round(recall(ei, ef), 4),  # int8 queries, fp32 index
               "recall_at_10_vs_int8_index": round(recall(ef, ei), 4)}  # fp32 queries, int8 index
    numbers["most_disagreeing_classes"] = sorted(disagree.items(), key=lambda kv: -kv[1])[:5]
    return rejudge(numbers, thresholds)


def rejudge(report: dict, thresholds: GateThresholds) -> dict:
    """``report``'s numbers judged against ``thresholds``: at judging time, and again for a stored report when
    the thresholds have changed since."""
    failed = [name for name, need in (("top1_agreement", thresholds.min_top1_agreement),
                                      ("mean_cosine", thresholds.min_mean_cosine),
                                      ("top5_overlap", thresholds.min_top5_overlap),
                                      ("recall_at_10_vs_fp32_index", thresholds.min_recall_at_10),
                                      ("recall_at_10_vs_int8_index", thresholds.min_recall_at_10))
              if report.get(name, -1) < need]
    return report | {"passed": not failed, "failed": failed, "thresholds": thresholds.to_dict()}
