"""Model runtime (devices, model loading, the inference worker). Built in issue #5; empty so far."""
