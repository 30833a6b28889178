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
