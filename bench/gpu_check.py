"""Run every test that only a CUDA machine can run, and the CUDA side of the device-parametrized ones.

    python bench/gpu_check.py              # on a machine with a CUDA GPU and Triton
    python bench/gpu_check.py --workers 1  # one pytest process (slower, easier to read)

CI runs on CPUs: there the kernels run in Triton's interpreter in fp32, and these paths are skipped or
never reached — the CUDA graph against eager decoding, the bf16 kernel variants, the half-precision
selection scores, the prompt's stream to pinned host memory, the zero-copy gather from pinned memory,
and the model and cache tests on a CUDA device. The default model must be installed (as for the tests).

Most of the time goes to compiling Triton kernels (one compilation per kernel and per set of its
compile-time constants), which is CPU work: the tests are dealt to several pytest processes that share
the GPU, and each prints its slowest tests.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ["tests/test_kernels.py", "tests/test_kvcache.py", "tests/test_model.py", "tests/test_kvcomp.py"]
SELECT = "gpu or cuda"  # "gpu" is a marker (tests that need CUDA); "cuda" matches the device parameter of the others


def collect(extra: list[str]) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-k", SELECT, *FILES, *extra], cwd=ROOT, capture_output=True, text=True)
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    if not ids:
        sys.stderr.write(out.stdout + out.stderr)
    return ids


def deal(ids: list[str], workers: int) -> list[list[str]]:
    """Tests of one function stay together (they share compiled kernels); functions are dealt in turn."""
    groups: dict[str, list[str]] = {}
    for i in ids:
        groups.setdefault(i.split("[")[0], []).append(i)
    shares = [[] for _ in range(workers)]
    for group in sorted(groups.values(), key=len, reverse=True):
        min(shares, key=len).extend(group)
    return [s for s in shares if s]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=min(4, max(1, (os.cpu_count() or 1) // 4)),
                   help="pytest processes sharing the GPU (default: a quarter of the CPUs, at most 4)")
    args, extra = p.parse_known_args()
    import torch
    if not torch.cuda.is_available():
        print("bench/gpu_check.py needs a CUDA device; on a CPU, run the tests: python -m pytest -q tests bench",
              file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}", flush=True)
    ids = collect(extra)
    if not ids:
        return 2
    t0 = time.perf_counter()
    runs = []
    for n, share in enumerate(deal(ids, args.workers)):
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "--durations=5", *share, *extra]
        runs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    rc = 0
    for n, run in enumerate(runs):
        out = run.communicate()[0]
        rc = max(rc, run.returncode)
        print(f"--- worker {n + 1}/{len(runs)} (exit status {run.returncode})\n{out.strip()}", flush=True)
    print(f"{len(ids)} tests in {len(runs)} processes: {time.perf_counter() - t0:.0f} s, "
          f"{'all passed' if rc == 0 else 'FAILURES above'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
