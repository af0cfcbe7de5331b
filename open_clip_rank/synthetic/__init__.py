"""Synthetic data made on the spot, for the demo, the tests and the benchmarks (no downloads): counting (rank),
ordinal and image-caption datasets.
"""
