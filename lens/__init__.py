"""Lens: EfficientNet image tagging, bulk embedding and similarity search on Ray.

The model runtime lives here (importable without Ray): :mod:`lens.decode`,
:mod:`lens.preprocess`, :mod:`lens.runtime`, :mod:`lens.predictor`. The Ray
layers are the top-level packages ``serve``, ``batch`` and ``index``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
