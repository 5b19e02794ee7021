"""The research shelf: selectors and kernels that measure or that lost their experiment, kept runnable.

`import research` registers its selectors into kvcache.SELECTORS (bench/accuracy.py, bench/latency.py and
the tests do; generate.py offers the core's only). research/README.md is the log of what was tried.
"""
from research import selection  # noqa: F401  (registers)
