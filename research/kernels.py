"""Kernels of the research selectors (research/selection.py), each beside its PyTorch reference.

  shortlist_scores  q . K of the shortlist selector's candidates, their exact keys on the device
"""
import triton
import triton.language as tl

from kernels import _check, _check_q, pow2


@triton.jit
def _shortlist_scores_kernel(q, k, k_h, k_m, vals, out, M, G, BM: tl.constexpr, BG: tl.constexpr, HD: tl.constexpr):
    h, b = tl.program_id(0), tl.program_id(1)
    g = tl.arange(0, BG)
    c = tl.arange(0, HD)
    qm = tl.sum(tl.load(q + (h * G + g)[:, None] * HD + c[None, :], mask=(g < G)[:, None], other=0.0).to(tl.float32),
                0) / G                                                               # the group's mean query
    j = b * BM + tl.arange(0, BM)
    inside = j < M
    kr = tl.load(k + h * k_h + j[:, None] * k_m + c[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
    live = tl.load(vals + h * M + j, mask=inside, other=float("-inf")) > float("-inf")
    tl.store(out + h * M + j, tl.where(live, tl.sum(kr * qm[None, :], 1), float("-inf")), mask=inside)


def shortlist_scores(q, k, vals, out, BM: int = 64):
    """out[h, j] = k[h, j] . the mean query of KV head h's group, for the candidates whose vals[h, j] > -inf,
    -inf elsewhere: the shortlist selector ranking its candidates on their exact keys k (n_kv, M, hd) on the
    device. vals, out: (n_kv, M). Reference: kvcache.Selector.rank."""
    n_kv, M, hd = k.shape
    _check_q(q, n_kv, hd)
    _check(k.stride(-1) == 1 and pow2(hd), f"k: (n_kv, M, hd), rows contiguous, hd a power of two, got {hd}")
    _check(vals.shape == out.shape == (n_kv, M) and vals.is_contiguous() and out.is_contiguous(), "vals, out: (n_kv, M)")
    G = q.shape[0] // n_kv
    _shortlist_scores_kernel[(n_kv, triton.cdiv(M, BM))](q, k, k.stride(0), k.stride(1), vals, out, M, G, BM=BM,
                                                         BG=triton.next_power_of_2(G), HD=hd)
    return out
