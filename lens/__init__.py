"""Lens: EfficientNet image tagging, bulk embedding and similarity search on Ray.

One import package, in layers (``tests/test_layers.py`` holds them to it), bottom first:

- this package's own modules: errors, the model identity, storage (local and ``s3://``), model packages, the Ray
  start (:mod:`lens.cluster`), and the HTTP client (:mod:`lens.client`);
- :mod:`lens.runtime`: decode, preprocess, backends and the predictor, importable without Ray;
  :mod:`lens.quality` (drift, feedback) and :mod:`lens.registry` (model versions and aliases);
- :mod:`lens.batch` (bulk embedding on Ray Data) and :mod:`lens.index` (FAISS indexes);
- :mod:`lens.serve` (Ray Serve: tagging, search, the event path :mod:`lens.serve.events`) and :mod:`lens.train`;
- :mod:`lens.cli`: the ``lens`` command and ``lens demo``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
