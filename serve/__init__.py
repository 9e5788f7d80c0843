"""Online and event-driven tagging on Ray Serve (built on :mod:`lens.runtime.predictor`)."""
