"""Run every test that only a CUDA machine can run, and the CUDA side of the device-parametrized ones.

    python bench/gpu_check.py            # on a machine with a CUDA GPU and Triton

CI runs on CPUs: there the kernels run in Triton's interpreter in fp32, and these paths are skipped or
never reached — the CUDA graph against eager decoding, the bf16 kernel variants, the half-precision
selection scores, the prompt's stream to pinned host memory, the zero-copy gather from pinned memory,
and the model and cache tests on a CUDA device. The default model must be installed (as for the tests).
"""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ["tests/test_kernels.py", "tests/test_kvcache.py", "tests/test_model.py"]


def main() -> int:
    import torch
    if not torch.cuda.is_available():
        print("bench/gpu_check.py needs a CUDA device; on a CPU, run the tests: python -m pytest -q tests bench",
              file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}", flush=True)
    # "gpu" is a marker (tests that need CUDA); "cuda" matches the device parameter of the others
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-k", "gpu or cuda", *FILES,
           *sys.argv[1:]]
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
