"""Latency: timed variants, MAC counts, sweeps."""
