"""Benchmarks behind ``kvrag bench``: speed and memory as ratios to a same-run baseline.

Kept out of ``kvrag.engine_plugin`` so that SGLang's processes never import them.
"""
