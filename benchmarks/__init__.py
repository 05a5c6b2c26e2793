"""Benchmarks: each figure is measured against its reference in the same run.

See docs/benchmarks.md.
"""
