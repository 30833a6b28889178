"""Register, stack, spill and shared-memory use of every CUDA kernel of adaperceiver._C, per
architecture: each csrc/cuda/*.cu compiled for sm_80 and sm_90 with the extension's nvcc flags
(setup.py) and torch's include paths, the ``ptxas -v`` lines parsed, kernel names demangled.

    python csrc/cuda/nvcc_resources.py [--out benchmarks/nvcc_resources.txt] [--jobs 2]

Writes the table (benchmarks/nvcc_resources.txt is its committed copy); exits 1 when a kernel
spills (tests/test_gpu_path.py runs it and holds every kernel to zero spill bytes). Needs nvcc
(CUDA_HOME or /usr/local/cuda*), not a GPU.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
ARCHS = ("80", "90")
# setup.py's nvcc flags for the extension, plus torch's own (cpp_extension.COMMON_NVCC_FLAGS)
FLAGS = ["-O3", "-std=c++20", "-Xptxas=-v", "-DADAPERCEIVER_WITH_CUDA=1",
         "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
         "--expt-relaxed-constexpr"]


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), *sorted(glob.glob("/usr/local/cuda*"), reverse=True)):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _includes() -> list[str]:
    import torch.utils.cpp_extension as ce
    torch_inc = [p for p in ce.include_paths() if "torch" in p]
    return ["-I" + p for p in [os.path.join(ROOT, "csrc"), *torch_inc,
                               sysconfig.get_paths()["include"]]]


def compile_resources(src: str, arch: str, nvcc: str) -> list[dict]:
    """ptxas' resource lines of one .cu for one sm_XX: one dict per kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, *FLAGS, *_includes(), f"-gencode=arch=compute_{arch},code=sm_{arch}",
               "-c", src, "-o", os.path.join(tmp, "k.o")]
        r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()][:20]
        raise RuntimeError(f"nvcc failed on {src} (sm_{arch}):\n" + "\n".join(errors))
    rows, name, cur = [], None, None
    for line in r.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if m:
            name = m.group(1)
            cur = {"arch": f"sm_{m.group(2)}", "mangled": name, "stack": 0, "spill_st": 0,
                   "spill_ld": 0, "regs": 0, "smem": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
    return rows


def demangle(names: list[str]) -> list[str]:
    filt = shutil.which("c++filt")
    if not filt:
        return names
    r = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    return r.stdout.splitlines() if r.returncode == 0 else names


def resources(nvcc: str, jobs: int = 2) -> list[dict]:
    srcs = sorted(glob.glob(os.path.join(HERE, "*.cu")))
    work = [(s, a) for s in srcs for a in ARCHS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as ex:
        parts = list(ex.map(lambda sa: compile_resources(sa[0], sa[1], nvcc), work))
    rows = [r for p in parts for r in p]
    for r, d in zip(rows, demangle([r["mangled"] for r in rows])):
        r["kernel"] = d.replace("adaperceiver::cuda::(anonymous namespace)::", "")
    return sorted(rows, key=lambda r: (r["arch"], r["kernel"]))


def table(rows: list[dict], nvcc: str) -> str:
    ver = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"V(\d+\.\d+\.\d+)", ver)
    lines = [
        "# ptxas resource use of the adaperceiver._C CUDA kernels (nvcc -Xptxas -v)",
        f"# nvcc {m.group(1) if m else '?'}, sm_80 and sm_90, the extension's nvcc flags "
        "(setup.py);",
        "# made by: python csrc/cuda/nvcc_resources.py --out benchmarks/nvcc_resources.txt",
        "# Compile-only (no GPU on the build machine). smem: static shared memory per block "
        "(bytes).",
        f"{'arch':6s} {'regs':>4s} {'stack':>6s} {'spill_st':>8s} {'spill_ld':>8s} "
        f"{'smem':>6s}  kernel",
    ]
    for r in rows:
        lines.append(f"{r['arch']:6s} {r['regs']:4d} {r['stack']:6d} {r['spill_st']:8d} "
                     f"{r['spill_ld']:8d} {r['smem']:6d}  {r['kernel']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the table here (default: print it)")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found (set CUDA_HOME)", file=sys.stderr)
        return 2
    rows = resources(nvcc, args.jobs)
    text = table(rows, nvcc)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text, end="")
    spills = [r for r in rows if r["spill_st"] or r["spill_ld"]]
    for r in spills:
        print(f"SPILL {r['arch']} {r['kernel']}: {r['spill_st']} B stored, {r['spill_ld']} B "
              "loaded", file=sys.stderr)
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
