"""Latency on a target device: the timing protocol, device fingerprints, targets (local, remote), cache, predictor, energy."""
