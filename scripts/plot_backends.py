#!/usr/bin/env python
"""benchmarks/model.png from benchmarks/model.json (scripts/bench_model.py): images/s per backend and precision at
each batch size, and each backend's agreement with ONNX Runtime fp32."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = json.loads((ROOT / "benchmarks" / "model.json").read_text())
    ips = m["images_per_s"]
    batches = list(next(iter(ips.values())))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(ips)
    for i, (name, row) in enumerate(ips.items()):
        a.bar([j + i * width for j in range(len(batches))], [row[k] for k in batches], width, label=name)
    a.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [k.replace("_", " ") for k in batches])
    a.set_ylabel("images/s")
    a.set_title(f"{m['model']} on {', '.join(m.get('cpu_flags', [])[:4])}")
    a.legend(fontsize=7)
    agree = m.get("agreement_with_onnx_fp32", {})
    names = list(agree)
    b.bar([n + "\ntop-1" for n in names], [agree[n]["top1_agreement"] for n in names], color="#36c")
    b.bar([n + "\ncosine" for n in names], [agree[n]["mean_cosine"] for n in names], color="#c63")
    b.set_ylim(0.8, 1.0)
    b.set_title("agreement with ONNX Runtime fp32")
    b.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(ROOT / "benchmarks" / "model.png", dpi=100)
    print("wrote benchmarks/model.png")


if __name__ == "__main__":
    main()
