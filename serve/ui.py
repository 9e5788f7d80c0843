"""The search page served at ``/ui``: one static HTML file (``ui.html``, no external resources) that calls the
JSON API from the browser: ``/v1/index`` for what is served, ``/v1/search`` (upload or drop an image),
``/v1/search/{id}`` (type an id, or click a hit), ``/v1/tag`` for the query's tags and ``/v1/thumbnail/{id}``
for each hit's image. With API keys on, the page asks for one and sends it as ``X-API-Key``."""

from __future__ import annotations

import functools
from importlib.resources import files

__all__ = ["ui_page", "ui_csp", "API_CSP"]

#: What every API answer allows a browser to do with it: nothing (JSON, no framing)
API_CSP = "default-src 'none'; frame-ancestors 'none'"


@functools.lru_cache(maxsize=1)
def ui_page() -> str:
    return files("serve").joinpath("ui.html").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def ui_csp() -> str:
    """The page's Content-Security-Policy: its one inline script and style allowed by their SHA-256 (no other
    script runs, injected or not), requests only to this origin, images also from presigned thumbnail URLs, and
    no framing."""
    import base64
    import hashlib
    import re

    page = ui_page()

    def digests(tag: str) -> str:
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(m.encode()).digest()).decode()}'"
                        for m in re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S))

    return (f"default-src 'none'; script-src {digests('script')}; style-src {digests('style')}; "
            "connect-src 'self'; img-src 'self' data: blob: https: http:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")
