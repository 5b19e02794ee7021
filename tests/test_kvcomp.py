"""research/kvcomp.py: the error-bounded quantizer keeps its bound (random and real tensors, constant blocks,
outliers), eps = 1/6 is KIVI's 2-bit grid, and the coders count what they claim."""
import math

import torch

from quant import quantize
from research import kvcomp


def test_every_value_is_within_its_bound_and_kivi_2_is_eps_one_sixth():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g) * torch.rand(64, 1, generator=g) * 5
    x[3] = 1.25                       # a constant block: step 0, exact
    x[5, 7] = 400.0                   # an outlier: its block's range, and bound, grow with it
    for eps in (0.5, 1 / 6, 0.1, 0.01):
        codes, mn, step = kvcomp.quantize_eb(x, eps)
        err = (kvcomp.dequantize(codes, mn, step) - x).abs()
        R = x.amax(-1) - x.amin(-1)
        assert (err <= eps * R[:, None] * (1 + 1e-5) + 1e-6).all() and (err[3] == 0).all()
        assert int(codes.max()) <= round(1 / (2 * eps))
    codes, _, _ = kvcomp.quantize_eb(x, 1 / 6)
    kivi, _, _ = quantize(x, 2, torch.float32)
    assert (codes == kivi.long()).float().mean() > 0.999  # the same grid (ties may round apart)
    k = torch.randn(2, 96, 64, generator=g)  # a channel's range as the bound
    ref = (k[0].amax(0) - k[0].amin(0)).repeat_interleave(3)
    b = kvcomp.blocks(k[0], 32, per_channel=True)
    codes, mn, step = kvcomp.quantize_eb(b, 0.1, ref)
    assert ((kvcomp.dequantize(codes, mn, step) - b).abs() <= 0.1 * ref[:, None] + 1e-6).all()
    r = kvcomp.measure(k, per_channel=True, eps=0.1, mode="channel")
    assert r["worst_error_over_bound"] <= 1 + 1e-5 and r["values"] == 2 * 96 * 64


def test_the_coders_count_bits_as_claimed():
    assert kvcomp.huffman_lengths([5, 0, 1, 1, 2]) == [1, 0, 3, 3, 2]  # a Huffman code of these counts
    assert kvcomp.huffman_lengths([0, 7]) == [0, 1]
    codes = torch.tensor([0, 1, 2, 3] * 256)
    assert kvcomp.entropy_bits(codes) == 2 * 1024 and kvcomp.huffman_bits(codes) == 2 * 1024 + 4 * 4
    assert kvcomp.for_bits(torch.full((64,), 3), code_bits=2) == 2 * (2 + 3)  # constant: no code bits
    c = torch.arange(32).repeat(2)
    assert kvcomp.for_bits(c, code_bits=5) == 2 * (32 * math.ceil(math.log2(32)) + 5 + 3)
