"""The search page served at ``/ui``: one static HTML file (``ui.html``, no external resources) that calls the
JSON API from the browser: ``/v1/index`` for what is served, ``/v1/search`` (upload or drop an image),
``/v1/search/{id}`` (type an id, or click a hit), ``/v1/tag`` for the query's tags and ``/v1/thumbnail/{id}``
for each hit's image. With API keys on, the page asks for one and sends it as ``X-API-Key``."""

from __future__ import annotations

import functools
from importlib.resources import files

__all__ = ["ui_page"]


@functools.lru_cache(maxsize=1)
def ui_page() -> str:
    return files("serve").joinpath("ui.html").read_text(encoding="utf-8")
