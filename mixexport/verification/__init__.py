"""Verification: tensor parity, metric parity on real data and latency, from a bundle directory
plus the original checkpoint (the eager reference). The entry points are in
:mod:`mixexport.verification.run` (``verify_bundle``, ``bench_bundle``, ``load_reference``); this
package imports nothing itself, so that the streaming metrics load without torch."""
