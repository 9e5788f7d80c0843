"""The search page on the demo's real data, in headless Chromium: benchmarks/ui.png and benchmarks/ui.json.

Runs `lens demo --keep` (real EfficientNet-Lite0, the sample photos and their augmented copies in moto's S3, the
FAISS index, the Serve app), opens ``/ui`` in Debian's Chromium driven by Playwright, searches with a cropped,
mirrored copy of the cat photo (not in the index), waits until every thumbnail has loaded from S3 through the
service, takes the screenshot, then clicks the second hit to search from it. ui.json records what the page
showed and how long each step took; console errors fail the script.

    python scripts/ui_screenshot.py [--out benchmarks]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM = os.environ.get("LENS_CHROMIUM", "/usr/bin/chromium")
#: flags for a closed network (no background connections) and a root user in a container
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

ALL_THUMBS_LOADED = ("n => document.querySelectorAll('.hit .thumb img').length === n && "
                     "[...document.querySelectorAll('.hit .thumb img')].every(i => i.complete && i.naturalWidth > 0)")


def query_image(path: Path) -> None:
    from PIL import Image

    from lens.runtime.samples import sample_path

    cat = Image.open(sample_path("chelsea.png")).convert("RGB")
    crop = cat.crop((40, 20, cat.width - 30, cat.height - 10)).transpose(Image.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    crop.save(buf, format="JPEG", quality=85)
    path.write_bytes(buf.getvalue())


def start_demo(workdir: Path) -> tuple[subprocess.Popen, str]:
    from lens.serve.frontdoor import port_or_free

    port = port_or_free(18000)
    proc = subprocess.Popen([sys.executable, "-m", "lens.cli.main", "demo", "--keep", "--no-dashboard",
                             "--workdir", str(workdir), "--port", str(port)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        print(line, end="", file=sys.stderr)
        if line.startswith("Lens is up at "):
            return proc, line.split()[4]
    raise RuntimeError(f"lens demo exited with {proc.wait()} before the service was up")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        query = tmp / "cat-crop.jpg"
        query_image(query)
        proc, url = start_demo(tmp / "demo")
        problems: list[str] = []
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                # wait_for_function evaluates in the page, which the page's own CSP forbids: bypass it here
                page = browser.new_context(bypass_csp=True, viewport={"width": 1280, "height": 860}).new_page()
                page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: problems.append(str(e)))
                t0 = time.perf_counter()
                page.goto(f"{url}/ui")
                page.wait_for_function("document.getElementById('index-info').textContent.includes('v-')")
                loaded_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                page.set_input_files("#file", str(query))
                page.wait_for_function(ALL_THUMBS_LOADED, arg=10, timeout=60_000)
                page.wait_for_function("document.querySelectorAll('#query-tags span').length === 3")
                search_s = time.perf_counter() - t0
                hits = [{"id": h.get_attribute("data-id"),
                         "score": float(h.query_selector(".score").text_content()),
                         "tags": [t.text_content() for t in h.query_selector_all(".tags span")]}
                        for h in page.query_selector_all(".hit")]
                query_tags = [t.text_content() for t in page.query_selector_all("#query-tags span")]
                page.screenshot(path=str(out / "ui.png"))
                t0 = time.perf_counter()
                second = hits[1]["id"]
                page.query_selector_all(".hit")[1].click()
                page.wait_for_function("s => document.getElementById('status').textContent.includes(s)",
                                       arg=f"result(s) for {second}")
                page.wait_for_function(ALL_THUMBS_LOADED, arg=10, timeout=60_000)
                click_s = time.perf_counter() - t0
                clicked = [h.get_attribute("data-id") for h in page.query_selector_all(".hit")]
                summary = {
                    "url": "/ui", "browser": browser.version, "index": page.text_content("#index-info"),
                    "model": page.text_content("#model-info"), "query": "chelsea.png cropped and mirrored",
                    "query_tags": query_tags,
                    "hits": hits, "clicked": second, "clicked_hits": clicked,
                    "page_load_s": round(loaded_s, 2), "search_with_thumbnails_s": round(search_s, 2),
                    "click_through_with_thumbnails_s": round(click_s, 2), "console_errors": problems,
                }
                browser.close()
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(120)
    (out / "ui.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    if problems:
        raise SystemExit(f"console errors: {problems}")


if __name__ == "__main__":
    main()
