"""Can selection hide under the weight reads? One layer's selection kernels at 131072 tokens (Llama-3.1-8B
shapes, bf16), each alone, then after three MLP-sized GEMVs on the same stream (serial) and on a second stream
forked beside them (concurrent), every variant replayed from a CUDA graph.

    python research/overlap.py            # writes bench/results/overlap.md

If the concurrent time is near max(GEMVs, selection), a second stream hides selection (the shortlist
selector's design); if it is near their sum, the GEMVs hold the SMs the selection kernels need.
"""
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # results

import kernels as K  # noqa: E402
from quant import QuantStore  # noqa: E402
from results import publish  # noqa: E402


def replay_us(fn, n=50) -> float:
    """Mean µs of fn captured once in a CUDA graph and replayed n times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles) off the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        graph.replay()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t) / n


@torch.inference_mode()
def main():
    n_kv, hd, N, H, dim, ffn = 8, 128, 131072, 32, 4096, 14336
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    w, x = torch.randn(ffn, dim, **bf16), torch.randn(1, dim, **bf16)
    sketch = QuantStore(n_kv, hd, N, bits=2, group=64, residual=64, per_channel=True, token_major=True, kernels=True,
                        **bf16)
    sketch.append(torch.randn(n_kv, N - 100, hd, **bf16))
    q, pos = torch.randn(H, hd, **bf16), torch.tensor(N - 101, device="cuda")
    scores = torch.empty(n_kv, N, device="cuda", dtype=torch.float16)
    host_k = torch.randn(N, n_kv, hd, dtype=torch.bfloat16).pin_memory()
    host_v = host_k.clone().pin_memory()
    K.sketch_scores(q, sketch, pos, scores, 8, 56)

    work = K.Candidates(n_kv, N, "cuda", scores.dtype)

    def topk(k):  # started from no last choice: the whole row is selected from
        last = torch.full((n_kv, k), -1, dtype=torch.long, device="cuda")
        return lambda: K.topk(scores, k, last, work)

    def gather(k):  # the top-k into rows that hold nothing before: every row fetched
        slots = K.Slots(host_k, host_v, torch.empty(n_kv, k, hd, **bf16), torch.empty(n_kv, k, hd, **bf16), scores.dtype)
        return lambda: (slots.clear(), K.topk(scores, k, slots.pos, work, rows=slots))

    def sketch_scores():
        K.sketch_scores(q, sketch, pos, scores, 8, 56)

    def selection(k):
        g = gather(k)
        return lambda: (sketch_scores(), g())

    def gemvs():
        for _ in range(3):
            torch.nn.functional.linear(x, w)

    def serial(work):
        return lambda: (gemvs(), work())

    side = torch.cuda.Stream()

    def concurrent(work):
        def run():
            side.wait_stream(torch.cuda.current_stream())
            gemvs()
            with torch.cuda.stream(side):
                work()
            torch.cuda.current_stream().wait_stream(side)
        return run

    alone = {"3 GEMVs 14336 x 4096 (an MLP's weights, 352 MB)": gemvs, "sketch scores": sketch_scores,
             "torch.topk, k = 128": lambda: scores.topk(128, dim=-1, sorted=False),
             "kernels.topk, k = 128 (no last choice)": topk(128), "kernels.topk, k = 512": topk(512),
             "top-128 + gather 128 rows (K and V, 8 heads)": gather(128), "top-512 + gather 512 rows": gather(512)}
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}; one layer at {N} tokens, bf16, CUDA graph replay",
             "", "| work | µs |", "|---|---|"]
    for name, fn in alone.items():
        lines.append(f"| {name} | {replay_us(fn):.1f} |")
        print(lines[-1], flush=True)
    lines += ["", "| after 3 GEMVs | serial µs | on a second stream µs |", "|---|---|---|"]
    for name, work in (("sketch scores", sketch_scores), ("top-512 + gather 512 rows", gather(512)),
                       ("sketch + top-128 + gather 128", selection(128)), ("sketch + top-512 + gather 512", selection(512))):
        lines.append(f"| {name} | {replay_us(serial(work)):.1f} | {replay_us(concurrent(work)):.1f} |")
        print(lines[-1], flush=True)
    publish(ROOT / "bench" / "results" / "overlap.md", "\n".join(lines))


if __name__ == "__main__":
    main()
