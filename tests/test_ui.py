"""The search page (/ui) in a real headless Chromium (Debian's chromium, driven by Playwright), over a real Serve
app: upload a photo, see it come back first with its thumbnail, click a hit to search from it, type an id; no
console errors. Thumbnails: read from where the index says each image lives, only inside the allowed roots."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
from test_serve import cluster, deploy, expect  # noqa: F401 - the module's Ray + Serve

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CHROMIUM = os.environ.get("LENS_CHROMIUM", "/usr/bin/chromium")
#: flags for a closed network (no background connections) and a root user in a container
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _index_with_locations(tmp_path: Path, tiny, photos: dict[str, bytes]) -> tuple[str, Path, dict[str, Path]]:
    """The photos written under ROOT/photos, embedded by the tiny model, indexed with their ``uri`` (what `lens
    shards` writes and `lens embed` keeps); one more item whose location lies outside the allowed root."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from lens.index.build import BuildConfig, build_index

    root = tmp_path / "photos"
    root.mkdir()
    paths = {}
    for name, data in photos.items():
        paths[name] = root / name
        paths[name].write_bytes(data)
    outside = tmp_path / "private" / "secret.png"
    outside.parent.mkdir()
    shutil.copy(paths[next(iter(photos))], outside)  # readable, but not through the service
    names = list(photos)
    preds = tiny.predict([photos[n] for n in names] + [outside.read_bytes()])
    ids = [f"photos/{n}" for n in names] + ["private/secret.png"]
    uris = [str(paths[n]) for n in names] + [str(outside)]
    emb = np.stack([p.embedding for p in preds]).astype(np.float32)
    emb[-1] = -emb[:-1].mean(0) / np.linalg.norm(emb[:-1].mean(0))  # far from every photo: never in their top 5
    tags = [[t.to_dict() for t in p.tags] for p in preds]
    part = tmp_path / "emb" / "part-0.parquet"
    part.parent.mkdir()
    pq.write_table(pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()),
                                                                                         emb.shape[1]),
                             "tags": tags, "uri": uris},
                            metadata={b"lens_model_identity": json.dumps(tiny.identity().to_dict()).encode()}), part)
    build_index(BuildConfig(embeddings=[str(part.parent)], output=str(tmp_path / "index"), queries=10),
                log=lambda *a: None)
    return str(tmp_path / "index"), root, paths


@pytest.fixture(scope="module")
def ui_app(cluster, tiny, photos, tmp_path_factory):  # noqa: F811 - the imported fixture
    tmp = tmp_path_factory.mktemp("ui")
    index, root, paths = _index_with_locations(tmp, tiny, photos)
    url = deploy(cluster, "ui", {"search": {"index": index}, "api": {"ui": {"local_roots": [str(root)]}}})
    return url, paths


def test_thumbnails_come_from_where_the_index_says_and_only_from_allowed_roots(ui_app):
    import io

    from PIL import Image

    url, paths = ui_app
    name = next(iter(paths))
    r = requests.get(f"{url}/v1/thumbnail/photos/{name}", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", r.text[:200]
    im = Image.open(io.BytesIO(r.content))
    orig = Image.open(paths[name])
    assert max(im.size) <= 256 and abs(im.size[0] / im.size[1] - orig.size[0] / orig.size[1]) < 0.05
    expect(requests.get(f"{url}/v1/thumbnail/private/secret.png", timeout=30), 403, "forbidden_location",
           "outside the allowed roots")
    expect(requests.get(f"{url}/v1/thumbnail/nope.jpg", timeout=30), 404, "not_found", "no id 'nope.jpg'")
    paths[name].rename(paths[name].with_suffix(".gone"))  # indexed, then deleted: 404, not a 500
    try:
        expect(requests.get(f"{url}/v1/thumbnail/photos/{name}", timeout=30), 404, "image_not_found", "gone")
    finally:
        paths[name].with_suffix(".gone").rename(paths[name])
    info = requests.get(f"{url}/v1/index", timeout=30).json()
    assert info["count"] == len(paths) + 1 and info["index_version"].startswith("v-")
    assert info["model_identity"]["model"] == "test_efficientnet"

    # the Python clients: the same routes
    import asyncio

    from lens.client import AsyncLensClient, LensAPIError, LensClient

    lens = LensClient(url)
    assert lens.index() == info and lens.thumbnail(f"photos/{name}") == r.content
    with pytest.raises(LensAPIError) as e:
        lens.thumbnail("private/secret.png")
    assert e.value.status == 403

    async def both():
        async with AsyncLensClient(url) as alens:
            return await alens.index(), await alens.thumbnail(f"photos/{name}")

    assert asyncio.run(both()) == (info, r.content)
    page = requests.get(f"{url}/ui", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # security headers: the page's script and style allowed by hash only, no framing, no sniffing; the API allows
    # a browser nothing
    csp = page.headers["content-security-policy"]
    assert "script-src 'sha256-" in csp and "'unsafe-inline'" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"
    api = requests.get(f"{url}/v1/index", timeout=30)
    assert api.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    assert api.headers["x-content-type-options"] == "nosniff"
    assert "Lens search" in page.text and "http://" not in page.text.split("<script>")[0]  # no external resources


def test_search_page_in_headless_chromium(ui_app, tmp_path):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium (apt-get install chromium)")
    url, paths = ui_app
    cat = "chelsea.png" if "chelsea.png" in paths else next(iter(paths))
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        # the walk-through below asks the page questions with wait_for_function (an eval, which the page's own CSP
        # forbids): its context bypasses the CSP; the strict page at the end checks the CSP itself
        page = browser.new_context(bypass_csp=True, viewport={"width": 1280, "height": 900}).new_page()
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("response", lambda r: problems.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)
        page.goto(f"{url}/ui")
        page.wait_for_function("document.getElementById('index-info').textContent.includes('v-')")
        assert "test_efficientnet" in page.text_content("#model-info")
        assert f"{len(paths) + 1} images" in page.text_content("#index-info")

        # upload a photo: it comes back first, with its thumbnail, score and tags; the query gets its own tags
        page.select_option("#k", "5")
        page.set_input_files("#file", str(paths[cat]))
        page.wait_for_selector(".hit", timeout=30_000)
        page.wait_for_function("document.querySelectorAll('.hit .thumb img').length === 5 && "
                               "[...document.querySelectorAll('.hit .thumb img')].every(i => i.complete && "
                               "i.naturalWidth > 0)", timeout=30_000)
        hits = page.query_selector_all(".hit")
        assert len(hits) == 5
        assert hits[0].get_attribute("data-id") == f"photos/{cat}"
        assert float(hits[0].query_selector(".score").text_content()) > 0.99
        assert hits[0].query_selector_all(".tags span"), "the hit's tags are shown"
        page.wait_for_function("document.querySelectorAll('#query-tags span').length === 3")
        page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)
        if os.environ.get("LENS_UI_SCREENSHOT"):
            shutil.copy(tmp_path / "ui.png", os.environ["LENS_UI_SCREENSHOT"])

        # click a hit: search from it (itself excluded), the address says which id
        second = hits[1].get_attribute("data-id")
        hits[1].click()
        page.wait_for_function("document.getElementById('status').textContent.includes("
                               f"{json.dumps('result(s) for ' + second)})")
        page.wait_for_function("document.querySelectorAll('.hit').length === 5")
        ids = [h.get_attribute("data-id") for h in page.query_selector_all(".hit")]
        assert second not in ids and f"photos/{cat}" in ids
        assert "id=" in page.url
        page.wait_for_function("document.querySelector('#drop img') !== null")  # the query's own thumbnail

        # type an id; an unknown one is an error on the page, not a crash
        page.fill("#id", f"photos/{cat}")
        page.click("#id-search")
        page.wait_for_function(f"document.getElementById('status').textContent.includes('result(s) for photos/{cat}')")
        assert f"photos/{cat}" not in [h.get_attribute("data-id") for h in page.query_selector_all(".hit")]
        page.fill("#id", "photos/no-such-image.jpg")
        page.click("#id-search")
        page.wait_for_function("document.getElementById('status').className === 'error'")
        assert "no-such-image.jpg" in page.text_content("#status"), page.text_content("#status")
        expected_404 = [p for p in problems if p.startswith("HTTP 404") and "no-such-image.jpg" in p]
        assert len(expected_404) == 1, problems  # the page asked, the API said 404, the page showed it
        problems.remove(expected_404[0])
        problems[:] = [p for p in problems if not (p.startswith("console error") and "404" in p)]
        page.fill("#id", f"photos/{cat}")  # and the page still works after the error
        page.click("#id-search")
        page.wait_for_function("document.getElementById('status').className === '' && document.getElementById("
                               f"'status').textContent.includes('result(s) for photos/{cat}')")

        # a filter narrows the search (inside the index: still k answers if enough match); a bad one is the API's
        # 400 message on the page
        keep = sorted(i for i in ids if i != f"photos/{cat}")[0]
        page.fill("#filter", json.dumps({"id": {"in": [keep]}}))
        page.click("#id-search")
        page.wait_for_function("document.querySelectorAll('.hit').length === 1 && document.querySelector('.hit')"
                               f".getAttribute('data-id') === {json.dumps(keep)}")
        page.fill("#filter", '{"colour": "red"}')
        page.click("#id-search")
        page.wait_for_function("document.getElementById('status').className === 'error'")
        assert "no item has the field 'colour'" in page.text_content("#status"), page.text_content("#status")
        bad = [p for p in problems if p.startswith("HTTP 400")]
        assert len(bad) == 1, problems
        problems.remove(bad[0])
        problems[:] = [p for p in problems if not (p.startswith("console error") and "400" in p)]
        page.fill("#filter", "")

        # under its own CSP (no bypass), the page loads and works without a violation (a violation is a console
        # error); an id from the address bar is one path segment: it cannot make the page call another route with
        # the user's key
        strict = browser.new_page()
        violations: list[str] = []
        strict.on("console", lambda m: violations.append(m.text) if m.type == "error" else None)
        strict.goto(f"{url}/ui")
        strict.wait_for_load_state("networkidle")
        assert "v-" in strict.text_content("#index-info") and not violations, violations
        requested: list[str] = []
        strict.on("request", lambda r: requested.append(r.url))
        strict.goto(f"{url}/ui?id=../../v1/models")
        strict.wait_for_load_state("networkidle")
        assert not [u for u in requested if u.split("?")[0].endswith("/v1/models")], requested
        assert any("/v1/search/..%2F..%2Fv1%2Fmodels" in u for u in requested), requested
        assert not [v for v in violations if "Content Security Policy" in v], violations
        browser.close()
    assert not problems, problems
