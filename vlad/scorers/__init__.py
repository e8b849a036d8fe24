"""One module per anomaly-detection method; each registers in :mod:`vlad.registry`."""
