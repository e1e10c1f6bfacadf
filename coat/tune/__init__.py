"""Sweeps on Ray Tune: search spaces, the sweep driver and its trials, the results table."""
