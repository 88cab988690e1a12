"""Reference (naive) implementations that prove the fast paths equal the published computation.

They live beside the tests, not in the package: production code never runs them. The benchmarks
import them (``sys.path`` holds the repository root) to time the fast path against them.
"""
