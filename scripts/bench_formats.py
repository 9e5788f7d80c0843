#!/usr/bin/env python
"""Decode + preprocess cost per image format, phone formats included; prints one JSON summary.

One real photograph (scikit-image's retina, 1411 x 1411) resized to a phone camera's 12 MP (4032 x 3024) and to
1 MP (1000 x 1000), then written by each format's own encoder at the quality phones use (JPEG 90, HEIF/HEIC 90 via
pillow-heif's libheif/x265, AVIF 90 via Pillow's libavif, WebP 90, PNG lossless). For each: the bytes, and the
median time of Lens's decode + preprocess (``Predictor.prepare_many``: decode under the limits, EXIF orientation,
RGB, resize and crop to the model's input) for one image on one thread, with the model's top-1 class on the
decoded image (the same class from every format is the check that the decode is right). The baseline is JPEG, the
format Lens's decode is tuned for (draft mode). Writes benchmarks/formats.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from bench_model import timed  # noqa: E402 - median seconds per call over rounds
from machine import describe  # noqa: E402

FORMATS = {"JPEG": {"quality": 90}, "HEIF": {"quality": 90}, "AVIF": {"quality": 90}, "WEBP": {"quality": 90},
           "PNG": {}}
SIZES = {"12mp_phone": (4032, 3024), "1mp": (1000, 1000)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per round")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "formats.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from lens.runtime.config import ModelConfig
    from lens.runtime.predictor import Predictor
    from lens.runtime.samples import sample_dir
    from PIL import Image

    predictor = Predictor.from_config(ModelConfig(backend="onnx", num_threads=1))
    retina = Image.open(sample_dir() / "retina.jpg").convert("RGB")
    out: dict = {}
    for size_name, size in SIZES.items():
        photo = retina.resize(size, Image.Resampling.LANCZOS)
        rows = {}
        for fmt, kw in FORMATS.items():
            buf = io.BytesIO()
            t0 = time.perf_counter()
            photo.save(buf, fmt, **kw)
            encode_s = time.perf_counter() - t0
            data = buf.getvalue()
            prepared = predictor.prepare_many([data])[0]
            top1 = predictor.predict([data])[0].tags[0].label
            ms = 1000 * timed(lambda d=data: predictor.prepare_many([d]), min_time=args.min_time, repeats=args.repeats)
            rows[fmt] = {"bytes": len(data), "bits_per_pixel": round(8 * len(data) / (size[0] * size[1]), 3),
                         "decode_preprocess_ms": round(ms, 2), "encode_s": round(encode_s, 3), "top1": top1,
                         "shape": list(prepared.shape)}
        jpeg = rows["JPEG"]["decode_preprocess_ms"]
        for r in rows.values():
            r["vs_jpeg"] = round(r["decode_preprocess_ms"] / jpeg, 2)
        out[size_name] = {"pixels": list(size), "formats": rows,
                          "same_top1_every_format": len({r["top1"] for r in rows.values()}) == 1}
    summary = {"benchmark": "formats", "machine": describe(), "photo": "scikit-image retina.jpg, resized",
               "threads": 1, "repeats": args.repeats, "sizes": out,
               "targets": {"every format decodes to the same top-1 class":
                           all(s["same_top1_every_format"] for s in out.values())}}
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
