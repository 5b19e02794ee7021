"""Selectors that measure, or that lost their experiment (research/README.md has the numbers).

Importing this module registers them into kvcache.SELECTORS, beside the core's; the benchmarks and the
tests import it (`import research`), generate.py does not. Each is written against the hooks of
kvcache.Selector only: the shortlist needs a buffer every layer shares and a second CUDA stream, and
declares both there (shared, shared_tensors, check), so the cache holds no code of its own for it.

  sketch-next        the sketch, where a token also scores as high as the token before it
  sketch-predicted   the sketch, ranked with this layer's query predicted one layer early
  exact, exact-heads every offloaded key in full precision (the oracle of a single-token top-k)
  shortlist, shortlist-heads  candidates fetched one layer early, re-ranked on their exact keys
  sketch-int8, sketch-heads-int8  the sketch scored with an int8 query (dp4a), rows kept across steps
"""
from contextlib import nullcontext

import torch

import kvcache
from kvcache import ConfigError, HeadwiseSketchSelector, Selector, SketchSelector
from quant import unpack

try:
    import kernels as K
    from research import kernels as RK
except ImportError:  # no Triton: the PyTorch path only
    K = RK = None


class NeighbourSketchSelector(SketchSelector):
    """The sketch, where a token also scores as high as the token before it: the top-k then takes the
    successor of a strong hit (the next token of a passage being read or copied) in place of a weaker
    token elsewhere, within the same budget. PyTorch path only."""
    step_scores = Selector.step_scores

    def scores(self, q, lo, hi):
        s = super().scores(q, lo, hi)
        return torch.cat([s[:, :1], torch.maximum(s[:, 1:], s[:, :-1])], dim=1)


class PredictedSketchSelector(SketchSelector):
    """The sketch, ranked against this layer's query predicted one layer early (Selector.predicted, as the
    channel selector predicts it): its selection need not wait for the layer's own query, so it could run
    while the layer before reads its weights. For measuring what the prediction costs; PyTorch path only."""
    predicts_query = True
    step_scores = Selector.step_scores

    def scores(self, q, lo, hi):
        return super().scores(self.predicted(q), lo, hi)


class ExactSelector(Selector):
    """For measurement, not a method (the oracle): every offloaded key in full precision, from the host
    store, ranked as the sketch ranks them (the group's mean query). What it loses against the full cache
    is what the budget and single-token selection lose; the sketch's further loss is its ranking."""

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


class Shortlist:
    """The candidates a shortlist selector fetched for one layer's step: positions (n_kv, M), their sketch
    scores (-inf: no candidate) and their K/V rows (n_kv, M, hd), on the device. One serves every layer, the
    next layer's being fetched after this one has read its own. With the kernels on CUDA the fetch runs on
    its own `stream`, from a copy `x` of the previous layer's normalised input."""

    def __init__(self, n_kv, M, hd, dim, device, dtype, score_dtype, stream=False):
        self.pos = torch.zeros(n_kv, M, dtype=torch.long, device=device)
        self.vals = torch.full((n_kv, M), float("-inf"), dtype=score_dtype, device=device)
        self.exact = torch.empty_like(self.vals)   # the candidates ranked with the step's own query
        self.k = torch.zeros(n_kv, M, hd, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.x = torch.zeros(1, 1, dim, dtype=dtype, device=device) if stream else None
        self.before = torch.zeros((), dtype=torch.long, device=device)  # the device position of the step before
        self.stream = torch.cuda.Stream(device) if stream else None

    def tensors(self):
        return [self.k, self.v]


class ShortlistSelector(SketchSelector):
    """Selection moved off the layer's critical path. One layer early, with the query predicted from the
    previous layer's input (Selector.predicted), the sketch picks M = shortlist x top-k candidates among the
    step's offloaded positions and their K/V rows are fetched to the device; at the layer's own step only the
    candidates are ranked, on their exact keys with the step's own query, and the top-k kept. On CUDA the
    early part runs on a stream of its own while the layer before reads its weights (a CUDA graph captures
    the fork and the join). A layer with no layer before it fetches at its own step, with its own query."""
    predicts_query = True
    options = {"shortlist": 4}  # candidates fetched per retrieved token

    @classmethod
    def factor(cls, cfg) -> int:
        """Candidates fetched per retrieved token: the select option, else its default."""
        return cfg.select_options.get("shortlist", cls.options["shortlist"])

    @classmethod
    def check(cls, cfg, head_dim, kernels):
        super().check(cfg, head_dim, kernels)
        n = cls.factor(cfg)
        if not isinstance(n, int) or n < 1:
            raise ConfigError("select_options", f"shortlist must be an integer >= 1 (candidates per retrieved "
                                                f"token), got {n!r}")
        if cfg.layer_topk:
            raise ConfigError("layer_topk", f"the {cfg.select!r} selector shares one candidate buffer across layers "
                                            f"and takes one top-k for all: drop layer_topk (or the plan's split)")

    @classmethod
    def score_width(cls, cfg, max_len):
        return max(max_len, cfg.topk * cls.factor(cfg))

    @classmethod
    def shared(cls, cfg, *, max_len, n_kv, hd, n_heads, dim, device, dtype, kernels):
        shared = super().shared(cfg, max_len=max_len, n_kv=n_kv, hd=hd, n_heads=n_heads, dim=dim, device=device,
                                dtype=dtype, kernels=kernels)
        M = cls.factor(cfg) * cfg.topk
        score_dtype = shared["scores"].dtype if "scores" in shared else torch.float32
        stream = kernels and dim is not None and torch.device(device).type == "cuda"
        shared["shortlist"] = Shortlist(n_kv, M, hd, dim, device, dtype, score_dtype, stream=stream)
        return shared

    @classmethod
    def shared_tensors(cls, shared):
        return shared["shortlist"].tensors()

    @classmethod
    def describe(cls, cfg):
        return f" ({cls.factor(cfg)}x top-k candidates)"

    def __init__(self, layer, cfg, wq, inv_freq):
        super().__init__(layer, cfg, wq, inv_freq)
        self.sink, self.recent, self.topk = layer.sink, layer.recent, layer.topk
        self.M = self.opts["shortlist"] * layer.topk
        self.shortlist = layer.shared["shortlist"]
        self.ahead = None  # the step the shortlist was fetched for early (its position; True on the kernel path)

    def see_previous_input(self, x, pos):
        """The early part, for the step at position pos: this step's token has not reached the layer yet."""
        lst = self.shortlist
        if not self.layer.kernels:
            super().see_previous_input(x, pos)
            self._fetch(self.qhat, self.sink, max(self.sink, pos + 1 - self.recent))
            self.ahead = pos
            return
        side = nullcontext()
        if lst.stream is not None:  # fork: the layer before goes on with its MLP while this runs
            x = lst.x.copy_(x)  # a buffer of the fork's own: the allocator may reuse x's memory meanwhile
            lst.stream.wait_stream(torch.cuda.current_stream(x.device))
            side = torch.cuda.stream(lst.stream)
        with side:  # the sketch holds the positions before pos: score them as the step before, window one shorter
            super().see_previous_input(x, pos)
            torch.sub(pos, 1, out=lst.before)
            self._step_fetch(self.qhat, lst.before, self.recent - 1)
        self.ahead = True

    def _fetch(self, q, lo, hi):
        """PyTorch path: the top-M of the sketch against q over positions [lo, hi), rows and all."""
        lst = self.shortlist
        lst.vals.fill_(float("-inf"))
        m = min(self.M, hi - lo)
        if m > 0:
            vals, idx = self.rank(self.store.dequantize()[:, lo:hi], q).topk(m, dim=-1)
            lst.vals[:, :m], lst.pos[:, :m] = vals, idx + lo
            rows, heads = lst.pos[:, :m].cpu(), torch.arange(self.n_kv)[:, None]
            lst.k[:, :m] = self.layer.host_k[rows, heads].to(lst.k.device)
            lst.v[:, :m] = self.layer.host_v[rows, heads].to(lst.v.device)

    def _step_fetch(self, q, pos, recent):
        """Kernel path: the same, over the offloaded positions of a step at device position pos."""
        lst, L, scores = self.shortlist, self.layer, self.layer.shared["scores"]
        K.sketch_scores(q, self.store, pos, scores, self.sink, recent)
        K.topk(scores, self.M, out=(lst.vals, lst.pos))
        K.gather_rows(lst.pos, lst.vals, L.host_k, L.host_v, lst.k, lst.v)

    def scores(self, q, lo, hi):
        if self.ahead != hi - 1 + self.recent:  # not fetched early for this step
            self._fetch(q, lo, hi)
        self.ahead = None
        lst = self.shortlist
        m = int((lst.vals[0] > float("-inf")).sum())  # the PyTorch path fills the first m slots
        out = torch.full((self.n_kv, hi - lo), float("-inf"), device=q.device)
        out.scatter_(1, lst.pos[:, :m] - lo, self.rank(lst.k[:, :m].float(), q))  # (n_kv, m) candidates ranked
        return out

    def step_select(self, q, pos):
        lst, L = self.shortlist, self.layer
        if self.ahead is None:
            self._step_fetch(q, pos, self.recent)
        elif lst.stream is not None:  # join
            torch.cuda.current_stream(q.device).wait_stream(lst.stream)
        self.ahead = None
        RK.shortlist_scores(q, lst.k, lst.vals, lst.exact)
        vals, j = lst.exact.topk(self.topk, dim=-1, sorted=False)
        K.gather_rows(j, vals, lst.k.transpose(0, 1), lst.v.transpose(0, 1), L.sel_k, L.sel_v)
        return vals, lst.pos.gather(1, j)

    def tensors(self):
        return self.store.tensors()  # the shared Shortlist is counted once, by the cache (shared_tensors)

    def h2d_bytes(self, n_off):  # the candidates' rows beyond the top-k the layer counts as gathered
        return 2 * self.n_kv * (min(self.M, n_off) - min(self.topk, n_off)) * self.hd * self.layer.host_k.element_size()


class HeadwiseShortlistSelector(ShortlistSelector):
    """The shortlist ranked per query head at both stages (Selector.rank, per_head): the predicted queries'
    softmax over the sketch picks the candidates, the step's own queries' softmax over their exact keys the
    top-k, the largest over the group's heads each time. PyTorch path only."""
    per_head = True
    step_scores = Selector.step_scores


class Int8SketchSelector(SketchSelector):
    """The sketch, scored with the query in int8 (research.kernels.int8_sketch_scores: four codes per dp4a
    instruction in place of a shift, mask, convert and multiply-add each), and the last step's choice reused:
    `reuse` 1 keeps the layer's retrieved rows across steps, so that a position chosen again stays in its row
    and only the others cross PCIe (research.kernels.retrieve); 2 (default) also starts the top-k from the
    last choice (research.kernels.warm_topk); 0 neither. Exact given the scores: the rows hold their top-k."""
    options = {"reuse": 2}

    @classmethod
    def check(cls, cfg, head_dim, kernels):
        super().check(cfg, head_dim, kernels)
        if cls.reuse(cfg) not in (0, 1, 2):
            raise ConfigError("select_options", "reuse is 0 (gather every row each step), 1 (keep the rows chosen "
                                                "again) or 2 (those, and the top-k started from the last choice)")

    @classmethod
    def reuse(cls, cfg):
        return cfg.select_options.get("reuse", cls.options["reuse"])

    @classmethod
    def shared(cls, cfg, **kw):
        shared = super().shared(cfg, **kw)
        if "scores" in shared and cls.reuse(cfg) == 2:
            s = shared["scores"]
            shared["candidates"] = RK.Candidates(*s.shape, s.device, s.dtype)
        return shared

    @classmethod
    def describe(cls, cfg):
        reuse = cls.reuse(cfg)
        return f" ({cfg.sketch_bits}-bit, int8 query{', per query head' if cls.per_head else ''}" \
               f"{', rows kept across steps' if reuse else ''}{', top-k from the last' if reuse == 2 else ''})"

    def __init__(self, layer, cfg, wq, inv_freq):
        super().__init__(layer, cfg, wq, inv_freq)
        scores = layer.shared.get("scores")
        self.slots = None if scores is None or not self.opts["reuse"] else \
            RK.Slots(self.n_kv, layer.topk, layer.att_k.device, scores.dtype)

    def scores(self, q, lo, hi):
        """rank() over positions lo..hi-1 of the sketch, as research.kernels.int8_sketch_scores does it: per
        group of g tokens the query times the group's scales, q_c * s_c, is brought to int8 (its largest
        |q_c * s_c| to 127, halves to even) and dotted with the codes exactly, plus token i's i / (2 g) so
        that equal integers rank the newer token first (the scores tie far more often than in floats); the
        minima add sum_c q_c * mn_c; the tokens still in the ring are exact. -> (n_kv, hi - lo)."""
        sketch = self.store
        n, g = sketch.n_q, sketch.g
        qs = self._queries(q)                                                           # (n_kv, Q, hd)
        codes = unpack(sketch.codes[:, :n], sketch.bits).float().unflatten(1, (n // g, g))  # (n_kv, n/g, g, hd)
        s, mn = sketch.scale[:, :n // g].float(), sketch.mn[:, :n // g].float()          # (n_kv, n/g, hd)
        top = (qs[:, None] * s[:, :, None]).abs().amax(-1, keepdim=True)                # (n_kv, n/g, Q, 1)
        qi = (qs[:, None] * s[:, :, None] * (127 / top.clamp_min(1e-30))).round()      # int8 values
        tie = torch.arange(g, device=q.device)[:, None] * (0.5 / g)
        dots = (codes @ qi.transpose(2, 3) + tie) * (top / 127).transpose(2, 3) + (mn @ qs.transpose(1, 2))[:, :, None]
        ring = sketch.dequantize()[:, n:] @ qs.transpose(1, 2)                          # (n_kv, L - n, Q)
        return self._combine(torch.cat([dots.flatten(1, 2), ring], 1)[:, lo:hi])

    def step_scores(self, q, pos, out, sink, recent):
        heads = self.head_scratch(q, out) if self.per_head else None
        RK.int8_sketch_scores(q, self.store, pos, out, sink, recent, heads)

    def step_select(self, q, pos):
        if self.slots is None:
            return super().step_select(q, pos)
        L, scores = self.layer, self.layer.shared["scores"]
        self.step_scores(q, pos, scores, L.sink, L.recent)
        if self.opts["reuse"] == 2:
            vals, idx = RK.warm_topk(scores, L.topk, self.slots.pos, L.shared["candidates"])
        else:
            vals, idx = K.topk(scores, L.topk)
        return RK.retrieve(idx, vals, self.slots, L.host_k, L.host_v, L.sel_k, L.sel_v)

    def rows_replaced(self):
        if self.slots is not None:
            self.slots.clear()


class HeadwiseInt8SketchSelector(Int8SketchSelector, HeadwiseSketchSelector):
    """The same, ranked per query head (Selector.rank, per_head; the scratch of kvcache's sketch-heads): each
    head's int8 dot products from the codes unpacked once for the group."""


RESEARCH_SELECTORS = {"sketch-next": NeighbourSketchSelector, "sketch-predicted": PredictedSketchSelector,
                      "exact": ExactSelector, "exact-heads": HeadwiseExactSelector, "shortlist": ShortlistSelector,
                      "shortlist-heads": HeadwiseShortlistSelector, "sketch-int8": Int8SketchSelector,
                      "sketch-heads-int8": HeadwiseInt8SketchSelector}
kvcache.SELECTORS.update(RESEARCH_SELECTORS)
