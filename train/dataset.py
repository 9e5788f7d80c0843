"""A training set: discovered, checked before any compute, and split.

Layouts (local or ``s3://``):

* ``DATA/<class>/...``: one folder per class (files deeper in a class folder belong to it); validation and test
  are seeded stratified splits of each class (``val_fraction``, ``test_fraction``).
* ``DATA/train/<class>/...`` and ``DATA/val/<class>/...`` (and optionally ``DATA/test/<class>/...``): the splits
  are given; without a test folder, the validation folder is split in two (seeded, stratified), so test images
  share no pixels with training images whenever the given folders don't.
* Parquet shards with an id, an encoded-image and a label column.

Three splits, each with one job: training fits the weights; validation chooses (early stopping, the best
checkpoint, the per-class thresholds, head or fine-tune); test only measures what was chosen, so the reported
accuracy, precision and recall are not those of the set that chose them.

Class names are kept exactly as written; two names equal after Unicode (NFKC) and case folding are refused,
since they would be one tag to a person and two to the model.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np

from lens.errors import LensError
from lens.storage import Location

from .config import GUIDANCE, MIN_PER_CLASS, SMALL_DATASET, TrainConfig

__all__ = ["Example", "Dataset", "DatasetError", "discover", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")


class DatasetError(LensError):
    code = "bad_dataset"
    http_status = 400


@dataclass
class Example:
    id: str  # path relative to the data root, or the Parquet id
    label: str
    split: str = "train"  # "train" | "val" | "test"
    path: str | None = None  # folder input: the file in the location's filesystem
    size: int = 0
    data: bytes | None = None  # Parquet input: the encoded image
    digest: str = ""  # SHA-256 of the encoded image (set when it is read)
    error: str | None = None  # why it could not be used ("code: message"), set by the embedding step


@dataclass
class Dataset:
    source: str
    layout: str  # "folders" | "train-val-folders" | "parquet"
    classes: list[str]
    examples: list[Example]
    loc: Location | None = None
    ignored: list[str] = field(default_factory=list)  # files that are not images
    warnings: list[str] = field(default_factory=list)
    feedback: dict | None = None  # --feedback: items added, and skipped by reason

    def read(self, ex: Example) -> bytes:
        if ex.data is not None:
            return ex.data
        return self.loc.read_bytes(ex.path)

    def take(self, rows) -> "Dataset":
        """The same dataset with only the examples at positions ``rows``, in that order."""
        return replace(self, examples=[self.examples[i] for i in rows])

    def split(self, name: str) -> list[Example]:
        return [e for e in self.examples if e.split == name]

    def counts(self, split: str | None = None) -> dict[str, int]:
        c = Counter(e.label for e in self.examples if split is None or e.split == split)
        return {k: c.get(k, 0) for k in self.classes}

    def report(self) -> dict:
        total = self.counts()
        lo, hi = min(total.values()), max(total.values())
        return {"source": self.source, "layout": self.layout, "classes": len(self.classes),
                "images": len(self.examples), **{s: len(self.split(s)) for s in SPLITS},
                "per_class": {k: {s: self.counts(s)[k] for s in SPLITS} for k in self.classes},
                "imbalance": round(hi / lo, 2), "ignored_files": len(self.ignored), "warnings": self.warnings} | (
                    {"feedback": self.feedback} if self.feedback is not None else {})

    def fingerprint(self) -> str:
        """SHA-256 over (split, label, content digest) of every example, sorted: the same data gives the same
        fingerprint whatever the order or file names (digests are set by the embedding step)."""
        rows = sorted(f"{e.split}\0{e.label}\0{e.digest}" for e in self.examples)
        return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def _short(name: str, n: int = 60) -> str:
    """A class name for a message: quoted, cut to ``n`` characters (a label column may hold anything)."""
    r = repr(name)
    return r if len(r) <= n else r[: n - 4] + "...'"


def _normal(name: str) -> str:
    return unicodedata.normalize("NFKC", name).casefold()


def _check_class_names(names) -> None:
    seen: dict[str, str] = {}
    for n in sorted(names):
        key = _normal(n)
        if key in seen:
            raise DatasetError(f"class folders {seen[key]!r} and {n!r} differ only in case or Unicode form; "
                               "merge or rename one (they would be one tag to a person, two to the model)")
        seen[key] = n


def _list(loc: Location, base: str) -> list[tuple[str, int]]:
    """(path, size) of every file under ``base``, hidden and ``_`` names skipped. Locally, a symlink is followed only
    to a file inside ``base``: a linked folder is never entered (no loops, nothing pulled in from elsewhere)."""
    import pyarrow.fs as pafs

    info = loc.fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise DatasetError(f"training data {loc.uri_of(base)} does not exist")
    if info.type == pafs.FileType.File:
        return [(base, info.size)]
    if loc.is_s3:
        out = []
        for fi in loc.fs.get_file_info(pafs.FileSelector(base, recursive=True)):
            rel = fi.path[len(base):].lstrip("/")
            if fi.type != pafs.FileType.File or any(p.startswith((".", "_")) for p in rel.split("/")):
                continue
            out.append((fi.path, fi.size))
        return sorted(out)
    return _local_files(base)


def _local_files(base: str) -> list[tuple[str, int]]:
    import os

    root = os.path.realpath(base)
    out = []
    for folder, dirs, files in os.walk(base, followlinks=False):  # a linked folder is listed, never entered
        dirs[:] = [d for d in dirs if not d.startswith((".", "_")) and not os.path.islink(os.path.join(folder, d))]
        for name in files:
            path = os.path.join(folder, name)
            if name.startswith((".", "_")):
                continue
            real = os.path.realpath(path)
            if real != root and not real.startswith(root + os.sep):
                continue  # a link out of the data folder
            if os.path.isfile(real):
                out.append((path, os.path.getsize(real)))
    return sorted(out)


def _folder_examples(loc: Location, base: str, split: str, ignored: list[str]) -> list[Example]:
    out, loose = [], []
    for path, size in _list(loc, base):
        rel = path[len(base):].lstrip("/")
        if not rel.lower().endswith(IMAGE_EXTENSIONS):
            ignored.append(rel)
            continue
        if "/" not in rel:
            loose.append(rel)
            continue
        out.append(Example(id=path[len(loc.root):].lstrip("/"), label=rel.split("/", 1)[0], split=split,
                           path=path, size=size))
    if loose:
        raise DatasetError(f"{len(loose)} image(s) directly in {loc.uri_of(base)} (e.g. {loose[0]!r}) belong to no "
                           "class: put each image in a folder named after its class")
    return out


def _parquet_examples(cfg: TrainConfig, loc: Location) -> list[Example]:
    import pyarrow.parquet as pq

    files = [p for p, _ in _list(loc, loc.root) if p.endswith(".parquet")]
    out = []
    cols = [cfg.id_column, cfg.image_column, cfg.label_column]
    for f in files:
        try:
            schema = pq.read_schema(f, filesystem=loc.fs)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a broken file
            raise DatasetError(f"{loc.uri_of(f)} is not a readable Parquet file: {e}") from None
        missing = [c for c in cols if c not in schema.names]
        if missing:
            raise DatasetError(f"{loc.uri_of(f)} has no column(s) {missing} (has {schema.names}); name them with "
                               "--id-column, --image-column and --label-column")
        t = pq.read_table(f, filesystem=loc.fs, columns=cols)
        for i, img, lab in zip(*(t.column(c).to_pylist() for c in cols)):
            if lab is None or str(lab) == "":
                raise DatasetError(f"{loc.uri_of(f)}: row with id {i!r} has no label")
            data = img if isinstance(img, bytes) else b""
            out.append(Example(id=str(i), label=str(lab), data=data, size=len(data)))
    return out


def discover(cfg: TrainConfig) -> Dataset:
    """List and check the training data (no image is decoded): layout, class names, images per class, the
    validation split. Raises :class:`DatasetError` with the reason; warnings go to ``Dataset.warnings``."""
    try:
        loc = Location.parse(cfg.data)
    except ValueError as e:
        raise DatasetError(str(e)) from None
    ignored: list[str] = []
    files = _list(loc, loc.root)
    if not files:
        raise DatasetError(f"training data {cfg.data} is empty")
    if all(p.endswith(".parquet") for p, _ in files):
        layout, examples = "parquet", _parquet_examples(cfg, loc)
        _split(examples, cfg)
    else:
        tops = {p[len(loc.root):].lstrip("/").split("/", 1)[0] for p, _ in files}
        given_val = cfg.val_data is not None or {"train", "val"} <= tops
        if cfg.val_data is not None:
            layout = "folders+val"
            examples = _folder_examples(loc, loc.root, "train", ignored)
            examples += _folder_examples(*_other(cfg.val_data, loc, "--val-data"), "val", ignored)
        elif given_val:
            layout = "train-val-folders"
            examples = (_folder_examples(loc, loc.path("train"), "train", ignored)
                        + _folder_examples(loc, loc.path("val"), "val", ignored))
        else:
            layout = "folders"
            examples = _folder_examples(loc, loc.root, "train", ignored)
        if cfg.test_data is not None:
            examples += _folder_examples(*_other(cfg.test_data, loc, "--test-data"), "test", ignored)
        elif given_val and "test" in tops and cfg.val_data is None:
            examples += _folder_examples(loc, loc.path("test"), "test", ignored)
        elif given_val:
            _split_off_test(examples, cfg)
        if not given_val:
            _split(examples, cfg, test=cfg.test_data is None)
    examples.sort(key=lambda e: (SPLITS.index(e.split), e.label, e.id))  # one order, whatever the listing's
    if not examples:
        raise DatasetError(f"no images found in {cfg.data} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    classes = sorted({e.label for e in examples})
    _check_class_names(classes)
    ds = Dataset(source=cfg.data, layout=layout, classes=classes, examples=examples, loc=loc, ignored=ignored)
    if cfg.feedback:
        extra, ds.feedback = _feedback_examples(cfg.feedback, set(classes), cfg.feedback_index)
        ds.examples += extra
    check_counts(ds)
    return ds


#: The largest feedback image read (the serving default's max_bytes).
_MAX_FEEDBACK_BYTES = 20 * 1024 * 1024


def _feedback_examples(uri: str, classes: set, index: str | None) -> tuple[list[Example], dict]:
    """Training examples from /v1/feedback parts: the last item per image id whose label is a training class and
    whose id the index at ``index`` holds. A feedback id is a client's string: it is only ever looked up among the
    index's ids, and the image is read from where the index says it lives (its ``uri``, or the id when the event
    path made it an ``s3://`` location), never opened as a path of the client's choosing."""
    from lens.index.search import location_from
    from lens.index.store import load_version

    from lens.errors import LensError
    from lens.quality.feedback import read_feedback

    if index is None:
        raise DatasetError("--feedback needs --feedback-index INDEX: feedback ids are looked up among the ids of the "
                           "index the service searched, never opened as paths", code="usage")
    try:
        rows = read_feedback(uri).to_pylist()
    except (ValueError, OSError) as e:
        raise DatasetError(f"--feedback {uri}: {e}") from None
    try:
        version = load_version(index, mmap=True)
    except (LensError, ValueError, OSError) as e:
        raise DatasetError(f"--feedback-index {index}: {e}") from None
    latest = {r["id"]: r for r in sorted(rows, key=lambda r: r.get("received_at") or 0.0)
              if r.get("id")}  # a later label for the same image wins
    skipped: Counter = Counter({"no image id": sum(1 for r in rows if not r.get("id"))})
    out = []
    for ident, r in sorted(latest.items()):
        label = r["labels"][0]
        if label not in classes:
            skipped["label is not a training class"] += 1
            continue
        row = version.row_of.get(ident)
        if row is None:
            skipped["id not in the index"] += 1
            continue
        try:
            where = location_from(ident, json.loads(version.metadata[row]), version.name)
            parent, _, name = where.rpartition("/")
            loc = Location.parse(parent or ".")
            if loc.info(loc.path(name)).size > _MAX_FEEDBACK_BYTES:
                skipped["image too large"] += 1
                continue
            data = loc.read_bytes(loc.path(name))
        except (LensError, ValueError, OSError, TypeError):
            skipped["image not readable"] += 1
            continue
        out.append(Example(id=f"feedback:{ident}", label=label, split="train", data=data, size=len(data)))
    return out, {"source": uri, "index": index, "items": len(rows), "added": len(out),
                 "skipped": {k: v for k, v in skipped.items() if v}}


def _other(uri: str, loc: Location, flag: str) -> tuple[Location, str]:
    """(location, root) of a --val-data or --test-data folder, on the same storage as --data."""
    try:
        other = Location.parse(uri)
    except ValueError as e:
        raise DatasetError(str(e)) from None
    if other.fs.__class__ is not loc.fs.__class__:
        raise DatasetError(f"{flag} must be on the same storage as --data (both local or both s3://)")
    return other, other.root


def _by_class(examples: list[Example], split: str) -> list[list[Example]]:
    """The examples of ``split``, per class, each class's in id order (the seeded draws depend on nothing else)."""
    by_class: dict[str, list[Example]] = {}
    for e in sorted((e for e in examples if e.split == split), key=lambda e: e.id):
        by_class.setdefault(e.label, []).append(e)
    return [items for _, items in sorted(by_class.items())]


def _split(examples: list[Example], cfg: TrainConfig, *, test: bool = True) -> None:
    """Seeded, stratified: each class keeps ``round(val_fraction * n)`` images for validation and (unless the
    test set is given) ``round(test_fraction * n)`` for test, at least 1 each and at least 1 left to train on."""
    rng = np.random.default_rng(cfg.seed)
    for items in _by_class(examples, "train"):
        n = len(items)
        n_val = min(n - 1, max(1, round(cfg.val_fraction * n)))
        n_test = min(n - 1 - n_val, max(1, round(cfg.test_fraction * n))) if test else 0
        order = rng.permutation(n)
        for j in order[:n_val]:
            items[j].split = "val"
        for j in order[n_val : n_val + n_test]:
            items[j].split = "test"


def _split_off_test(examples: list[Example], cfg: TrainConfig) -> None:
    """A given validation set without a test set: half of each class's validation images (seeded) become the
    test split; a class with a single validation image keeps it for validation (and gets no test image)."""
    rng = np.random.default_rng(cfg.seed + 1)
    for items in _by_class(examples, "val"):
        for j in rng.permutation(len(items))[: len(items) // 2]:
            items[j].split = "test"


def check_counts(ds: Dataset, *, after: str = "") -> None:
    """Refuse too few classes or images per class; warn on a small set and on imbalance."""
    if len(ds.classes) < 2:
        raise DatasetError(f"found {len(ds.classes)} class ({', '.join(ds.classes)}) in {ds.source}: training needs "
                           "at least 2 class folders")
    total = ds.counts()
    few = {k: v for k, v in total.items() if v < MIN_PER_CLASS}
    if few:
        listed = ", ".join(f"{_short(k)}: {v}" for k, v in sorted(few.items())[:10])
        if len(few) > 10:
            listed += f" and {len(few) - 10} more classes"
        raise DatasetError(f"every class needs at least {MIN_PER_CLASS} images{after}; too few in {listed}")
    if ds.layout != "parquet" and ds.layout != "folders":
        val = ds.counts("val")
        missing = [k for k, v in val.items() if v == 0]
        if missing:
            raise DatasetError(f"the validation set has no images of {', '.join(map(repr, missing))}")
        no_test = [k for k, v in ds.counts("test").items() if v == 0]
        if no_test and not any(w.startswith("no test images") for w in ds.warnings):
            ds.warnings.append(f"no test images of {', '.join(map(repr, no_test[:10]))}: the test metrics leave "
                               "them out (give 2+ validation images per class, or a test folder)")
        no_train = [k for k, v in ds.counts("train").items() if v == 0]
        if no_train:
            raise DatasetError(f"the validation set has classes the training set lacks: {', '.join(map(repr, no_train))}")
    if len(ds.examples) < SMALL_DATASET and not any(w.startswith("only") for w in ds.warnings):
        ds.warnings.append(f"only {len(ds.examples)} images: {GUIDANCE}")
    lo, hi = min(total.values()), max(total.values())
    if hi >= 5 * lo and not any(w.startswith("class imbalance") for w in ds.warnings):
        big = max(total, key=total.get)
        small = min(total, key=total.get)
        ds.warnings.append(f"class imbalance {hi / lo:.1f}x ({big!r}: {hi} images, {small!r}: {lo}): rare classes "
                           "will be predicted less often; add images or expect lower recall on them")
