"""Offline bulk embedding on Ray Data (built on :mod:`lens.runtime.predictor`)."""
