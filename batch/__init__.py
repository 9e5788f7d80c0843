"""Offline bulk embedding on Ray Data (built on :mod:`lens.predictor`)."""
