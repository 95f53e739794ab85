"""Verification: tensor parity, metric parity on real data and latency, from a bundle directory
plus the original checkpoint (the eager reference)."""

from __future__ import annotations

from mixexport.verification.run import bench_bundle, load_reference, verify_bundle

__all__ = ["bench_bundle", "load_reference", "verify_bundle"]
