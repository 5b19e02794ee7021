"""The research shelf: selectors and compressors that measure or that lost their experiment, kept runnable.

`import research` registers its selectors into kvcache.SELECTORS (bench/accuracy.py, bench/latency.py and
the tests do; generate.py offers the core's selectors only); research.kvcomp.quantizer(eps) registers
KVComp's compressor into kvcache.QUANTIZERS. research/README.md is the log of what was tried.
"""
from research import kvcomp, selection  # noqa: F401  (registers)
