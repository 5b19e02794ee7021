"""The research shelf: selectors and kernels that measure or that lost their experiment, kept runnable.

`import research` registers its selectors into kvcache.SELECTORS and its quantizer into kvcache.QUANTIZERS
(bench/accuracy.py, bench/latency.py and the tests do; generate.py offers the core's selectors only, and
research/kvcomp.py's quantizer through --error-bound). research/README.md is the log of what was tried.
"""
from research import kvcomp, selection  # noqa: F401  (registers)
