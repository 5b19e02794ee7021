"""Selectors that measure (research/README.md has the numbers of those that lost and left).

Importing this module registers them into kvcache.SELECTORS, beside the core's; the benchmarks and the
tests import it (`import research`), generate.py does not. Each is a kvcache.Selector: it scores, the
layer takes the top-k and brings the rows.

  exact, exact-heads   every offloaded key in full precision, ranked by the group's mean query or by each
                       query head (the oracle of a single-token top-k at the budget)
"""
import kvcache
from kvcache import Selector


class ExactSelector(Selector):
    """For measurement, not a method (the oracle): every offloaded key in full precision, from the host
    store, ranked as the sketch ranks them (the group's mean query). What it loses against the full cache
    is what the budget and single-token selection lose; the sketch's further loss is its ranking.
    PyTorch path only."""

    def __init__(self, layer, cfg, wq, inv_freq):
        super().__init__(layer, cfg, wq, inv_freq)
        self.host_k = layer.host_k

    def scores(self, q, lo, hi):
        keys = self.host_k[lo:hi].to(q.device).float().transpose(0, 1)        # (n_kv, n_off, hd)
        return self.rank(keys, q)

    def h2d_bytes(self, n_off):
        return n_off * self.n_kv * self.hd * self.host_k.element_size()


class HeadwiseExactSelector(ExactSelector):
    """The oracle ranked by each query head on its own (Selector.rank, per_head)."""
    per_head = True


RESEARCH_SELECTORS = {"exact": ExactSelector, "exact-heads": HeadwiseExactSelector}
kvcache.SELECTORS.update(RESEARCH_SELECTORS)
