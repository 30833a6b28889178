"""Ahead-of-time GPU compiles of every Triton kernel of adaperceiver.kernels, with resource use.

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` emits
PTX and a cubin; registers and spills come from Triton's own ``ptxas -v`` on that PTX, shared
memory from the kernel metadata. This catches GPU-only errors (a ``tl.dot`` dimension below 16,
shared memory overflow, register spills) on a CPU-only machine.

``COMPILE_SPECS`` format (each kernel module, e.g. ``adaperceiver.kernels.attention`` and
``adaperceiver.kernels.matryoshka``, defines a module-level list of plain dicts)::

    {
      "name": "attn_fwd D=64 rope",          # row label in the table (unique in the module)
      "kernel": "_attn_fwd",                 # attribute name of the @triton.jit function
      "signature": {"Q": "*{dtype}:16",      # EVERY argument, in order, Triton type strings:
                    "N": "i32",              #   "*fp16", "*fp32", "*i32", "i32", "fp32", ...
                    "BLOCK": "constexpr"},   #   constexpr arguments are typed "constexpr"
      "constexprs": {"BLOCK": 64},           # the value of every constexpr argument
      "num_warps": 4, "num_stages": 3,       # launch options (defaults 4 and 3)
      "dtypes": ("fp16", "bf16"),            # optional: only these dtypes (default: all asked)
    }

``{dtype}`` inside a signature type or a string constexpr is replaced by the dtype being
compiled ("fp16" / "bf16"). A ``:16`` suffix on a type is a divisibility hint (the argument is a
multiple of 16, as Triton's runtime specializes it), the convention of ``triton/tools/compile.py``.

The compiles run in a subprocess with ``TRITON_INTERPRET`` unset: under ``TRITON_INTERPRET=1``
``@triton.jit`` yields interpreter functions, which ``ASTSource`` cannot compile
(``AttributeError: 'InterpretedFunction' object has no attribute 'cache_key'``).

Usage: ``python -m adaperceiver.kernels.compile --out benchmarks/triton_resources.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Iterable, Optional

__all__ = ["MODULES", "collect_specs", "compile_all", "format_table", "main"]

# the kernel modules whose COMPILE_SPECS are compiled (a module that is missing or defines no
# COMPILE_SPECS is skipped, and reported)
MODULES = ("adaperceiver.kernels.attention", "adaperceiver.kernels.matryoshka")
DTYPES = ("fp16", "bf16", "fp32")
ARCHS = (80, 90)
_REQUIRED = ("name", "kernel", "signature", "constexprs")


def collect_specs(modules: Iterable[str] = MODULES) -> tuple[list[dict], list[str]]:
    """(specs, notes): every module's COMPILE_SPECS, each spec tagged with its "module";
    notes say which modules were skipped and why."""
    specs, notes = [], []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - reported, the other modules still compile
            notes.append(f"{name}: not importable ({type(e).__name__}: {e})")
            continue
        found = getattr(mod, "COMPILE_SPECS", None)
        if found is None:
            notes.append(f"{name}: defines no COMPILE_SPECS")
            continue
        for spec in found:
            missing = [key for key in _REQUIRED if key not in spec]
            if missing:
                raise ValueError(f"{name}.COMPILE_SPECS entry {spec.get('name')!r} lacks "
                                 f"{missing}; required keys: {list(_REQUIRED)}")
            specs.append({**spec, "module": name})
    return specs, notes


def _subst(value, dtype: str):
    return value.replace("{dtype}", dtype) if isinstance(value, str) else value


def _ptxas_log(ptx: str, arch: int) -> str:
    """Run Triton's ptxas on the PTX with the flags Triton's own cubin build uses, plus -v."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o",
               os.path.join(tmp, "k.o")]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stderr


@contextlib.contextmanager
def _knob(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _compile_one(spec: dict, arch: int, dtype: str) -> dict:
    """Compile one spec for one (arch, dtype) in THIS process (TRITON_INTERPRET must be unset)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    if not hasattr(fn, "arg_names") or not hasattr(fn, "cache_key"):
        raise RuntimeError(f"{spec['module']}.{spec['kernel']} is not a compilable @triton.jit "
                           "function (is TRITON_INTERPRET=1 set in this process?)")
    sig = spec["signature"]
    if set(sig) != set(fn.arg_names):
        raise ValueError(f"{spec['name']}: signature keys {sorted(sig)} differ from the "
                         f"kernel's arguments {fn.arg_names}")
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):      # Triton wants the kernel's argument order
        ty = _subst(sig[arg], dtype)
        if ty.endswith(":16"):
            attrs[(i,)] = [["tt.divisibility", 16]]
            ty = ty[:-3]
        signature[arg] = ty
    constexprs = {k: _subst(v, dtype) for k, v in spec["constexprs"].items()}
    row = {"module": spec["module"], "name": spec["name"], "kernel": spec["kernel"],
           "arch": arch, "dtype": dtype, "num_warps": spec.get("num_warps", 4),
           "num_stages": spec.get("num_stages", 3)}
    t0 = time.perf_counter()
    try:
        # Triton's own ptxas run prints its -v log with this knob (a cache miss); on a cache
        # hit there is no log and ptxas is run again on the cached PTX
        captured = io.StringIO()
        with _knob(triton.knobs.nvidia, "dump_ptxas_log", True), \
                contextlib.redirect_stdout(captured):
            compiled = triton.compile(
                ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": row["num_warps"], "num_stages": row["num_stages"]})
        log = captured.getvalue()
        if "registers" not in log:
            log = _ptxas_log(compiled.asm["ptx"], arch)
    except Exception as e:  # noqa: BLE001 - a failed compile is a result row, not a crash
        row.update(error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
                   if str(e).strip() else type(e).__name__,
                   seconds=round(time.perf_counter() - t0, 2))
        return row
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    row.update(registers=int(regs.group(1)) if regs else None,
               spill_stores=int(spill.group(1)) if spill else None,
               spill_loads=int(spill.group(2)) if spill else None,
               shared=int(compiled.metadata.shared), error=None,
               seconds=round(time.perf_counter() - t0, 2))
    return row


def _worker(job_file: str) -> None:
    """Subprocess entry: compile the jobs listed in job_file, print one JSON row per line."""
    with open(job_file) as f:
        jobs = json.load(f)
    specs, _ = collect_specs(sorted({j["module"] for j in jobs}))
    by_key = {(s["module"], s["name"]): s for s in specs}
    for j in jobs:
        row = _compile_one(by_key[(j["module"], j["name"])], j["arch"], j["dtype"])
        print(json.dumps(row), flush=True)


def compile_all(archs: Iterable[int] = ARCHS, dtypes: Iterable[str] = DTYPES, *,
                modules: Iterable[str] = MODULES, names: Optional[Iterable[str]] = None,
                select: Optional[Iterable[tuple[str, str]]] = None,
                jobs: Optional[int] = None) -> tuple[list[dict], list[str]]:
    """Compile every COMPILE_SPECS entry for every (arch, dtype).

    Returns (rows, notes): one row per compile with registers, spill_stores, spill_loads,
    shared (bytes), seconds and error (None when it compiled); notes name skipped modules.
    The compiles run in ``jobs`` subprocesses (default: the CPU count, at most 4) with
    TRITON_INTERPRET unset, so this works from an interpreting process (e.g. under pytest).
    ``names``: only specs whose name contains one of these strings; ``select``: only these
    (module, spec name) pairs.
    """
    archs, dtypes, modules = list(archs), list(dtypes), list(modules)
    names = None if names is None else list(names)
    select = None if select is None else {tuple(x) for x in select}
    for d in dtypes:
        if d not in ("fp16", "bf16", "fp32"):
            raise ValueError(f"dtype={d!r} is not allowed; allowed: fp16, bf16, fp32")
    for a in archs:
        if not isinstance(a, int) or a < 70:
            raise ValueError(f"arch={a!r} is not allowed; allowed: ints >= 70 (80 = sm_80)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the spec lists are read in a clean subprocess too: under TRITON_INTERPRET=1 importing
    # the modules here would work, but the lists must describe the compiled build
    probe = subprocess.run(
        [sys.executable, "-c", "import json, sys; from adaperceiver.kernels.compile import "
         "collect_specs; s, n = collect_specs(json.loads(sys.argv[1])); print(json.dumps("
         "[[x['module'], x['name'], x.get('dtypes')] for x in s] + [n]))", json.dumps(modules)],
        env=env, capture_output=True, text=True)
    if probe.returncode:
        raise RuntimeError(f"reading COMPILE_SPECS failed:\n{probe.stderr}")
    *listed, notes = json.loads(probe.stdout.strip().splitlines()[-1])
    work = [{"module": m, "name": n, "arch": a, "dtype": d}
            for m, n, only in listed for a in archs for d in dtypes
            if (only is None or d in only)
            and (names is None or any(s in n for s in names))
            and (select is None or (m, n) in select)]
    jobs = max(1, min(jobs or min(os.cpu_count() or 1, 4), len(work) or 1))
    shards = [work[i::jobs] for i in range(jobs)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i, shard in enumerate(shards):
            path = os.path.join(tmp, f"jobs{i}.json")
            with open(path, "w") as f:
                json.dump(shard, f)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "adaperceiver.kernels.compile", "--worker", path],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for p in procs:
            out, err = p.communicate()
            if p.returncode:
                raise RuntimeError(f"compile worker failed (exit {p.returncode}):\n{err[-4000:]}")
            rows.extend(json.loads(line) for line in out.splitlines() if line.startswith("{"))
    order = {(w["module"], w["name"], w["arch"], w["dtype"]): i for i, w in enumerate(work)}
    rows.sort(key=lambda r: order[(r["module"], r["name"], r["arch"], r["dtype"])])
    return rows, notes


def format_table(rows: list[dict], notes: Iterable[str] = ()) -> str:
    """The committed markdown table (benchmarks/triton_resources.md)."""
    import triton
    lines = ["# Triton kernel resources (ahead-of-time compile, no GPU needed)", "",
             f"Generated by `python -m adaperceiver.kernels.compile --out "
             f"benchmarks/triton_resources.md` with triton {triton.__version__}: every "
             "COMPILE_SPECS entry (the default tiles of each dtype, and the attention "
             "forward's autotuning candidates, named 'cand'), compiled with "
             "`triton.compile(ASTSource(...), target=GPUTarget('cuda', arch, 32))`; registers "
             "and spills from Triton's ptxas (`-v`, Triton's own flags), shared memory from "
             "the kernel metadata. Registers are per thread (limit 255).", ""]
    lines += [f"Note: {n}" for n in notes] + ([""] if notes else [])
    lines += ["| module | kernel | arch | dtype | warps | stages | registers | spill stores "
              "| spill loads | shared (bytes) | status |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        status = "ok" if not r.get("error") else "FAILED: " + r["error"].replace("|", "/")
        lines.append(f"| {r['module'].rsplit('.', 1)[-1]} | {r['name']} | sm_{r['arch']} | "
                     f"{r['dtype']} | {r['num_warps']} | {r['num_stages']} | "
                     f"{r.get('registers', '')} | {r.get('spill_stores', '')} | "
                     f"{r.get('spill_loads', '')} | {r.get('shared', '')} | {status} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adaperceiver.kernels.compile",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the markdown table here (default: print it)")
    ap.add_argument("--archs", default="80,90", help="comma-separated, e.g. 80,90")
    ap.add_argument("--dtypes", default="fp16,bf16,fp32",
                    help="comma-separated: fp16,bf16,fp32")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compile processes")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    rows, notes = compile_all([int(a) for a in args.archs.split(",")],
                              args.dtypes.split(","), jobs=args.jobs)
    table = format_table(rows, notes)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    else:
        sys.stdout.write(table)
    bad = [r for r in rows if r.get("error") or r.get("spill_stores")]
    for r in bad:
        print(f"{r['module']} {r['name']} sm_{r['arch']} {r['dtype']}: "
              f"{r.get('error') or str(r['spill_stores']) + ' bytes spilled'}", file=sys.stderr)
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
