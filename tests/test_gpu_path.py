"""The GPU path's host side, checked without a GPU (none is available to this project).

Parameters and inputs are fake CUDA tensors (FakeTensorMode: shapes, dtypes and devices, no
data, no driver). On them we check what decides whether a GPU forward runs asynchronously:
- torch.compile / export: the model traces as one graph (strict export is dynamo with
  fullgraph: any graph break is an error), our ops are single nodes;
- no host sync: nothing is read back to the host (``.item()``, ``.tolist()``: on fake tensors
  those raise), and no host->device copy blocks (a blocking copy synchronises the stream);
- the Triton wrappers' host code (schedules, index tensors) runs with its kernel launches
  replaced by no-ops, under the same recorder.
What this cannot show is the kernels' numbers on a GPU; tests/test_kernels_compile.py compiles
every kernel for sm_80/sm_90.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import tiny_model


class HostStalls(TorchFunctionMode):
    """Records the calls that stall the host on a GPU: a read of device values (``item``,
    ``tolist``, ``cpu``, ``numpy``, a copy to the host), a blocking host->device copy
    (``torch.tensor(..., device=cuda)``, ``.to(cuda)`` / ``.cuda()`` / ``copy_`` without
    non_blocking), and indexing a CUDA tensor with a list or a host tensor (ATen copies that
    index to the device, blocking, out of a function mode's sight)."""

    READS = {"item", "tolist", "cpu", "numpy"}
    FACTORIES = {"tensor", "as_tensor", "asarray", "from_numpy"}
    INDEXING = {"__getitem__", "__setitem__", "index_select", "index_copy", "index_copy_",
                "index_add", "index_add_", "index_put", "index_put_", "index_fill_", "take",
                "gather", "scatter", "scatter_"}

    def __init__(self):
        super().__init__()
        self.stalls: list[str] = []
        # every host->device copy, blocking or not: a CUDA graph cannot capture one (pageable
        # memory), so a repeated configuration must make none
        self.copies: list[str] = []

    @staticmethod
    def _on(t, kind):
        return isinstance(t, torch.Tensor) and t.device.type == kind

    @classmethod
    def _host_index(cls, idx) -> bool:
        if isinstance(idx, tuple):
            return any(cls._host_index(i) for i in idx)
        return isinstance(idx, list) or (cls._on(idx, "cpu") and idx.dim() > 0)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in self.READS and self._on(args[0], "cuda"):
            self.stalls.append(f"{name}() of a CUDA tensor")
        if name == "copy_" and self._on(args[0], "cuda") and self._on(args[1], "cpu") \
                and not (kwargs.get("non_blocking") or (len(args) > 2 and args[2])):
            self.stalls.append("blocking copy_ host -> cuda")
        if name == "copy_" and self._on(args[0], "cpu") and self._on(args[1], "cuda"):
            self.stalls.append("copy_ cuda -> host")
        if name in self.INDEXING and self._on(args[0], "cuda") \
                and any(self._host_index(a) for a in list(args[1:]) + list(kwargs.values())):
            self.stalls.append(f"{name} of a CUDA tensor with a host index")
        if name == "copy_" and self._on(args[0], "cuda") and self._on(args[1], "cpu"):
            self.copies.append(f"copy_ host -> cuda of {tuple(args[1].shape)}")
        out = func(*args, **kwargs)
        if name in ("to", "cuda") and self._on(args[0], "cpu") and self._on(out, "cuda"):
            self.copies.append(f".{name}() host -> cuda of {tuple(args[0].shape)}")
        if name in self.FACTORIES and self._on(out, "cuda"):
            self.copies.append(f"torch.{name}(..., device=cuda)")
        if name in self.FACTORIES and self._on(out, "cuda"):
            self.stalls.append(f"torch.{name}(..., device=cuda): a blocking copy")
        if name in ("to", "cuda") and self._on(args[0], "cpu") and self._on(out, "cuda") \
                and not kwargs.get("non_blocking"):
            self.stalls.append(f"blocking .{name}() host -> cuda of {tuple(args[0].shape)}")
        if name == "to" and self._on(args[0], "cuda") and self._on(out, "cpu"):
            self.stalls.append(f".to() cuda -> host of {tuple(args[0].shape)}")
        return out


def _fake_mode():
    return FakeTensorMode(allow_non_fake_inputs=True)


def _on_fake_cuda(model: torch.nn.Module, fake_mode) -> torch.nn.Module:
    """The model's parameters and buffers as fake CUDA tensors."""
    with fake_mode:
        for mod in model.modules():
            for name, p in list(mod.named_parameters(recurse=False)):
                mod._parameters[name] = torch.nn.Parameter(fake_mode.from_tensor(p).to("cuda"),
                                                           requires_grad=False)
            for name, b in list(mod.named_buffers(recurse=False)):
                if b is not None:
                    mod._buffers[name] = fake_mode.from_tensor(b).to("cuda")
    return model


class _Logits(torch.nn.Module):
    def __init__(self, model, config):
        super().__init__()
        self.model, self.config = model, config

    def forward(self, x):
        return self.model(x, **self.config).logits


def _read(name):
    def read(x):
        try:
            getattr(x.sum(), name)()
        except Exception:    # fake tensors have no value to read: recorded first, then raises
            pass
    return read


STALLS = {
    "tensor_on_cuda": lambda x: torch.tensor([1, 2], device="cuda"),
    "blocking_to_cuda": lambda x: torch.arange(3).to("cuda"),
    "blocking_copy_to_cuda": lambda x: torch.empty(3, device="cuda").copy_(torch.ones(3)),
    "to_host": lambda x: x.to("cpu"),
    "copy_to_host": lambda x: torch.empty(4, 3).copy_(x),
    "list_index": lambda x: x[[1, 0]],
    "host_tensor_index": lambda x: x[torch.tensor([0, 1])],
    "item": _read("item"),
    "tolist": _read("tolist"),
    "cpu": _read("cpu"),
}
FINE = {
    "non_blocking_to_cuda": lambda x: torch.arange(3).to(device="cuda", dtype=torch.int32,
                                                         non_blocking=True),
    "slice": lambda x: x[1:3] * 2,
    "device_index": lambda x: x[torch.tensor([0, 1]).to("cuda", non_blocking=True)],
}


@pytest.mark.parametrize("name", list(STALLS) + list(FINE))
def test_host_stalls_recorder_sees_what_it_must(name):
    """The recorder flags each kind of stall and nothing else (else the tests below could fail
    to fail, or fail for nothing); it lists every host->device copy, blocking or not."""
    with _fake_mode(), HostStalls() as rec:
        x = torch.ones(4, 3, device="cuda")
        {**STALLS, **FINE}[name](x)
    assert bool(rec.stalls) == (name in STALLS), rec.stalls
    copies = {"tensor_on_cuda", "blocking_to_cuda", "blocking_copy_to_cuda",
              "non_blocking_to_cuda", "device_index", "host_tensor_index"}
    # (host_tensor_index: ATen copies the index out of the mode's sight; a stall, not a copy)
    assert bool(rec.copies) == (name in copies - {"host_tensor_index"}), rec.copies


FIXED = [dict(num_tokens=256, mat_dim=96, depth=4), dict(num_tokens=64, mat_dim=48, depth=2)]
MIXED = dict(num_tokens=[64, 96, 32], mat_dim=[48, 96, 72], depth=[2, 4, 3])


@pytest.mark.parametrize("config", FIXED, ids=["full", "t64_w48_l2"])
def test_fixed_config_traces_as_one_graph_with_no_host_tensor(config):
    """torch.compile's GPU path for a fixed config: one graph (strict export), our ops as single
    nodes, and not one tensor in it on the host (so no host->device copy at all)."""
    fake = _fake_mode()
    model = _on_fake_cuda(tiny_model().eval(), fake)
    torch._dynamo.reset()
    with fake:
        x = torch.randn(2, 3, 64, 64, device="cuda")
        program = torch.export.export(_Logits(model, config), (x,), strict=True)
    calls = [n for n in program.graph.nodes if n.op == "call_function"]
    targets = [str(n.target) for n in calls]
    blocks = config["depth"]
    # attention: read, every block, write; a width-sliced FFN in every block, and the patch
    # embedding's full-width one
    assert targets.count("adaperceiver.block_masked_attention.default") == blocks + 2
    assert targets.count("adaperceiver.matryoshka_ffn.default") == blocks + 1
    assert not [t for t in targets if "_local_scalar_dense" in t or t.endswith(".item")]
    on_host = []
    for n in calls:
        vals = n.meta.get("val")
        for v in vals if isinstance(vals, (tuple, list)) else [vals]:
            if isinstance(v, torch.Tensor) and v.device.type != "cuda":
                on_host.append(f"{n.target} -> {v.device}")
    assert not on_host, on_host
    out = [n for n in program.graph.nodes if n.op == "output"][0].args[0][0].meta["val"]
    assert out.device.type == "cuda" and tuple(out.shape) == (2, 1, 17)


# the fused q/k/v weight is keyed on its parts' data_ptr (model/layers.py), which fake tensors
# only pretend to have
@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")
@pytest.mark.parametrize("config", FIXED + [MIXED], ids=["full", "t64_w48_l2", "mixed"])
def test_eager_forward_on_cuda_makes_no_host_stall(config):
    """The eager forward (our ops' dispatch aside: they run as their fake implementations) of a
    fixed config and of a mixed batch given as lists: no read-back and no blocking copy. The
    mixed batch's index tensors are built on the host and copied with non_blocking."""
    fake = _fake_mode()
    model = _on_fake_cuda(tiny_model().eval(), fake)
    with fake, torch.no_grad(), HostStalls() as rec:
        out = model(torch.randn(3, 3, 64, 64, device="cuda"), **config)
    assert out.logits.device.type == "cuda" and tuple(out.logits.shape) == (3, 1, 17)
    assert not rec.stalls, rec.stalls


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")
def test_distilled_backbone_mixed_batch_makes_no_host_stall():
    """The distilled backbone's per-patch features of a mixed batch (its write head groups the
    samples by token count)."""
    import adaperceiver
    from helpers import randomize_
    cfg = dict(depth=2, embed_dim=64, num_heads=2, mask_token_grans=[8, 16], max_latent_tokens=16,
               img_size=56, patch_size=14, mat_dims=[32, 64], output_feat_dim=48, num_classes=10)
    fake = _fake_mode()
    model = _on_fake_cuda(randomize_(adaperceiver.create_model("adaperceiver_v1", **cfg)).eval(),
                          fake)
    with fake, torch.no_grad(), HostStalls() as rec:
        out = model(torch.randn(3, 3, 56, 56, device="cuda"), num_tokens=[8, 16, 8],
                    mat_dim=[32, 64, 64], depth=[1, 2, 2])
    assert out.features.device.type == "cuda" and tuple(out.features.shape) == (3, 16, 48)
    assert not rec.stalls, rec.stalls


class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` records the launch, runs
    nothing (fake tensors have no memory)."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(self.name)


def _no_launches(monkeypatch, module):
    """Replace every Triton kernel of ``module`` (helpers too: only kernels are launched from
    Python); returns the list the launches are recorded in."""
    from triton.runtime.jit import KernelInterface
    launches = []
    for name, obj in list(vars(module).items()):
        if isinstance(obj, KernelInterface):
            monkeypatch.setattr(module, name, _NoLaunch(name, launches))
    return launches


@pytest.mark.parametrize("ragged", [False, True], ids=["one_length", "seq_lens"])
def test_triton_attention_host_side_makes_no_host_stall(monkeypatch, ragged):
    from adaperceiver.kernels import attention as tri
    from adaperceiver.ops.reference import rope_tables
    launches = _no_launches(monkeypatch, tri)
    with _fake_mode(), HostStalls() as rec:
        B, H, N, D = 2, 2, 96, 32
        q, k, v = (torch.randn(B, H, N, D, device="cuda") for _ in range(3))
        lens = torch.tensor([96, 40], dtype=torch.int32).to("cuda", non_blocking=True) \
            if ragged else None
        rope = rope_tables(N, D, device="cuda")
        out, lse = tri.attention_forward(q, k, v, [32, 64, 96], seq_lens=lens, q_rope=rope,
                                         k_rope=rope)
        go = torch.randn_like(out)
        grads = tri.attention_backward(go, q, k, v, out, lse, [32, 64, 96], seq_lens=lens,
                                       q_rope=rope, k_rope=rope)
    assert out.shape == (B, H, N, D) and all(g.device.type == "cuda" for g in grads)
    assert "_attn_fwd" in launches and "_attn_bwd_dq" in launches, launches
    assert not rec.stalls, rec.stalls


def test_triton_matryoshka_ffn_host_side_makes_no_host_stall(monkeypatch):
    from adaperceiver.kernels import matryoshka as tri
    launches = _no_launches(monkeypatch, tri)
    with _fake_mode(), HostStalls() as rec:
        B, N, C, Hd = 3, 40, 48, 96
        x = torch.randn(B, N, C, device="cuda")
        w1, b1 = torch.randn(Hd, C, device="cuda"), torch.randn(Hd, device="cuda")
        w2, b2 = torch.randn(C, Hd, device="cuda"), torch.randn(C, device="cuda")
        hidden = [96, 17, 50]
        out = tri.ffn_forward(x, w1, b1, w2, b2, hidden)
        grads = tri.ffn_backward(torch.randn_like(out), x, w1, b1, w2, b2, hidden)
    assert out.shape == (B, N, C) and len(grads) == 5
    assert {"_fc1_gelu_kernel", "_rows_by_hidden_kernel", "_dpre_kernel",
            "_hidden_by_cols_kernel"} <= set(launches), launches
    assert not rec.stalls, rec.stalls


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_packed_attention_on_cuda_makes_no_host_stall(monkeypatch, backend):
    """block_masked_attention_varlen's body on CUDA: Triton's packed forward (sample starts and
    lengths copied without blocking), or, for a backend without a packed kernel, the padded
    fallback (indices built on the device)."""
    from adaperceiver import ops
    from adaperceiver.kernels import attention as tri
    from adaperceiver.ops.inputs import PackedAttentionInputs
    from adaperceiver.ops.reference import rope_tables
    launches = _no_launches(monkeypatch, tri)
    with _fake_mode(), HostStalls() as rec, ops.use_backend(backend):
        lens, H, D = [96, 40, 64], 2, 32
        q, k, v = (torch.randn(sum(lens), H, D, device="cuda") for _ in range(3))
        rope = rope_tables(96, D, device="cuda")
        out, lse = ops.attention._attention_varlen_forward(PackedAttentionInputs.build(
            q, k, v, lens, [32, 64, 96], q_rope=rope, k_rope=rope))
    assert out.shape == (sum(lens), H, D) and lse.shape == (3, H, 96)
    assert out.device.type == "cuda"
    # (K is rotated once per row by the pre-pass, then read by the forward)
    assert launches == (["_rope_rows", "_attn_fwd"] if backend == "triton" else []), launches
    assert not rec.stalls, rec.stalls


# ----------------------------------------------------------------------------- second call
# A repeated configuration makes no host->device copy at all (kernels.schedule.device_memo: index
# tensors built once per value), so its forward can be captured in a CUDA graph, where a
# pageable copy is not allowed, and costs no host-to-device traffic.
@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")
@pytest.mark.parametrize("config", FIXED + [MIXED], ids=["full", "t64_w48_l2", "mixed"])
def test_second_forward_makes_no_host_to_device_copy(config):
    fake = _fake_mode()
    model = _on_fake_cuda(tiny_model().eval(), fake)
    with fake, torch.no_grad():
        x = torch.randn(3, 3, 64, 64, device="cuda")
        with HostStalls() as first:
            model(x, **config)
        with HostStalls() as second:
            out = model(torch.randn_like(x), **config)
    assert out.logits.device.type == "cuda"
    assert not first.stalls and not second.stalls, (first.stalls, second.stalls)
    assert not second.copies, second.copies
    if config is MIXED:     # the mixed batch's indices are host-known: copied the first time
        assert first.copies


def test_triton_host_side_second_call_makes_no_copy(monkeypatch):
    """The Triton wrappers' index tensors (row_end, seq_lens of a packed batch, sample starts,
    the FFN schedule) come from the memo on a repeated call; another configuration builds its
    own (keyed by value)."""
    from adaperceiver.kernels import attention as tri
    from adaperceiver.kernels import matryoshka as mk
    from adaperceiver.ops.reference import rope_tables
    launches = (_no_launches(monkeypatch, tri), _no_launches(monkeypatch, mk))
    fake = _fake_mode()

    def calls(lens, hidden, grans):
        H, D = 2, 32
        q, k, v = (torch.randn(sum(lens), H, D, device="cuda") for _ in range(3))
        rope = rope_tables(max(lens), D, device="cuda")
        tri.attention_varlen_forward(q, k, v, lens, grans, None, rope, rope)
        qp = torch.randn(len(lens), H, max(lens), D, device="cuda")
        out, lse = tri.attention_forward(qp, qp, qp, grans)
        tri.attention_backward(torch.randn_like(out), qp, qp, qp, out, lse, grans)
        x = torch.randn(len(hidden), 8, 48, device="cuda")
        w1, b1 = torch.randn(96, 48, device="cuda"), torch.randn(96, device="cuda")
        w2, b2 = torch.randn(48, 96, device="cuda"), torch.randn(48, device="cuda")
        y = mk.ffn_forward(x, w1, b1, w2, b2, hidden)
        mk.ffn_backward(torch.randn_like(y), x, w1, b1, w2, b2, hidden)

    with fake:
        with HostStalls() as first:
            calls([96, 40, 64], [96, 17, 50], [32, 64, 96])
        with HostStalls() as second:
            calls([96, 40, 64], [96, 17, 50], [32, 64, 96])
        with HostStalls() as other:
            calls([90, 40, 64], [96, 17, 51], [32, 64, 90])
    assert "_attn_fwd" in launches[0] and "_fc1_gelu_kernel" in launches[1], launches
    assert first.copies and not second.copies, second.copies
    assert other.copies           # new values: built (the memo is keyed by value)
    assert not first.stalls and not second.stalls and not other.stalls


# ----------------------------------------------------------------------------- the memo itself
def test_device_memo_is_keyed_by_value_and_never_by_history():
    """Off the CPU ("meta" here, as a GPU would be): the same values give the same tensor, other
    values (or dtype, or device) another; the CPU is never memoised; the memo is bounded."""
    from adaperceiver.kernels import schedule as S
    S.clear_device_memo()
    a = S.to_device([3, 1, 2], "meta", torch.int32)
    assert S.to_device((3, 1, 2), "meta", torch.int32) is a
    assert S.to_device([3, 1, 4], "meta", torch.int32) is not a
    assert S.to_device([3, 1, 2], "meta", torch.int64) is not a
    assert S.to_device([3, 1, 2], "cpu") is not S.to_device([3, 1, 2], "cpu")
    t = torch.tensor(5)                  # not a plain value: copied each time, never a key
    first = S.to_device([t, 1], "meta")
    t.fill_(6)
    assert S.to_device([t, 1], "meta") is not first
    r = S.ranges([0, 10], [2, 3], "meta")
    assert S.ranges([0, 10], [2, 3], "meta") is r and r.shape == (5,)
    assert torch.equal(S.ranges([0, 10], [2, 3], "cpu"), torch.tensor([0, 1, 10, 11, 12]))
    re = S.row_end(50, [8, 24], device="meta")
    assert S.row_end(50, [8, 24], device="meta") is re
    assert S.row_end(50, [8, 25], device="meta") is not re
    old = S.DEVICE_MEMO_SIZE
    try:
        S.DEVICE_MEMO_SIZE = 4
        first = S.to_device([0], "meta")
        for i in range(1, 10):
            S.to_device([i], "meta")
        assert len(S._memo) <= 4 and S.to_device([0], "meta") is not first
    finally:
        S.DEVICE_MEMO_SIZE = old
        S.clear_device_memo()


def test_device_memo_entries_built_in_inference_mode_serve_autograd_later():
    """An entry first built under torch.inference_mode is a normal tensor: a later training
    step can save it for backward (an inference tensor could not be)."""
    from adaperceiver.kernels import schedule as S
    S.clear_device_memo()
    with torch.inference_mode():
        idx = S.ranges([0, 5], [2, 2], "meta")
    assert not idx.is_inference()
    x = torch.randn(8, 3, device="meta", requires_grad=True)
    again = S.ranges([0, 5], [2, 2], "meta")
    assert again is idx
    x.index_select(0, again).sum().backward()      # index saved for backward: allowed
    S.clear_device_memo()


def test_fake_mode_entries_stay_with_their_mode():
    """Entries made under a FakeTensorMode are fake and kept with that mode only: the real memo
    never hands out a fake tensor, and a new fake mode builds its own."""
    from torch._subclasses.fake_tensor import FakeTensor

    from adaperceiver.kernels import schedule as S
    S.clear_device_memo()
    fake = _fake_mode()
    with fake:
        t = S.to_device([1, 2, 3], "cuda", torch.int32)
        assert isinstance(t, FakeTensor) and S.to_device([1, 2, 3], "cuda", torch.int32) is t
    assert not any(isinstance(v, FakeTensor) for v in S._memo.values())
    with _fake_mode():
        assert S.to_device([1, 2, 3], "cuda", torch.int32) is not t
    S.clear_device_memo()


# ----------------------------------------------------------------------------- fp32 precision
class _KwargsLaunch:
    def __init__(self, name, seen):
        self.name, self.seen = name, seen

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.seen.append((self.name, kwargs.get("PRECISION")))


@pytest.mark.parametrize("setting,attn,ffn", [("highest", "tf32x3", "ieee"),
                                              ("high", "tf32", "tf32"),
                                              ("medium", "tf32", "tf32")])
def test_fp32_dots_follow_torch_matmul_precision(monkeypatch, setting, attn, ffn):
    """Every Triton launch of both ops on float32 gets the tl.dot precision that
    torch.get_float32_matmul_precision() asks for (TF32 at "high"/"medium"); fp16 keeps its
    own."""
    from triton.runtime.jit import KernelInterface

    from adaperceiver.kernels import attention as tri
    from adaperceiver.kernels import matryoshka as mk
    seen = []
    for mod in (tri, mk):
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, KernelInterface):
                monkeypatch.setattr(mod, name, _KwargsLaunch(name, seen))
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        with _fake_mode():
            for dtype in (torch.float32, torch.float16):
                seen.clear()
                q = torch.randn(2, 2, 40, 32, device="cuda", dtype=dtype)
                out, lse = tri.attention_forward(q, q, q, [8, 40])
                tri.attention_backward(torch.randn_like(out), q, q, q, out, lse, [8, 40])
                tri.attention_varlen_forward(q[0].transpose(0, 1), q[0].transpose(0, 1),
                                             q[0].transpose(0, 1), [30, 10], [8, 40])
                x = torch.randn(2, 8, 48, device="cuda", dtype=dtype)
                w1, b1 = (torch.randn(96, 48, device="cuda", dtype=dtype),
                          torch.randn(96, device="cuda", dtype=dtype))
                w2, b2 = (torch.randn(48, 96, device="cuda", dtype=dtype),
                          torch.randn(48, device="cuda", dtype=dtype))
                y = mk.ffn_forward(x, w1, b1, w2, b2, [96, 17])
                mk.ffn_backward(torch.randn_like(y), x, w1, b1, w2, b2, [96, 17])
                got = {(n.startswith("_attn"), p) for n, p in seen if n != "_attn_bwd_delta"}
                want = ({(True, attn), (False, ffn)} if dtype == torch.float32
                        else {(True, "tf32"), (False, "ieee")})
                assert got == want, (dtype, sorted(seen))
                assert len(seen) >= 9
    finally:
        torch.set_float32_matmul_precision(old)


# ----------------------------------------------------------------------------- launch geometry
def test_cuda_launch_grid_takes_batch_heads_above_65535(tmp_path):
    """csrc/cuda/launch.h, compiled for the host: batch * heads goes on grid.x (limit 2^31 - 1),
    so B * H > 65535 launches (grid.y would refuse it); row tiles on y; the limits are named when
    exceeded, and an empty launch is {0, 0}."""
    import os
    import shutil
    import subprocess
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = tmp_path / "grid.cpp"
    src.write_text(r'''
#include <cstdio>
#include "launch.h"
using namespace adaperceiver::cuda;
void show(long bh, long rows, long bm) {
  try {
    Grid2 g = attention_grid(bh, rows, bm);
    std::printf("ok %ld %ld\n", (long)g.x, (long)g.y);
  } catch (const std::invalid_argument& e) { std::printf("error %s\n", e.what()); }
}
int main() {
  show(256L * 13, 256, 64);        // the model's batch: (3328, 4)
  show(8192L * 13, 256, 64);       // B * H = 106496 > 65535: on x
  show(2147483648L, 64, 64);       // past grid.x
  show(13, 65535L * 64 + 1, 64);   // 65536 row tiles: past grid.y
  show(0, 256, 64);                // no work
  show(13, 0, 64);
  show(13, 100, 0);                // bad tile
  Grid2 f = checked_grid(ceil_div(256L * 4096, 32), ceil_div(2138, 32));   // the FFN's
  std::printf("ok %ld %ld\n", (long)f.x, (long)f.y);
}
''')
    exe = tmp_path / "grid"
    subprocess.run([cxx, "-std=c++17", "-I", os.path.join(root, "csrc", "cuda"), str(src), "-o",
                    str(exe)], check=True, capture_output=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True,
                           text=True).stdout.splitlines()
    assert lines[0] == "ok 3328 4"
    assert lines[1] == "ok 106496 4"
    assert lines[2].startswith("error grid.x = 2147483648 exceeds the CUDA limit 2147483647")
    assert lines[3].startswith("error grid.y = 65536 exceeds the CUDA limit 65535")
    assert lines[4] == lines[5] == "ok 0 0"
    assert lines[6].startswith("error attention_grid: rows=100, rows_per_block=0")
    assert lines[7] == "ok 32768 67"


def test_no_autotuning_while_tracing(monkeypatch):
    """Under a FakeTensorMode (torch.compile's tracing, these tests) nothing runs, so the
    forward's tile autotuner must not try to time candidates."""
    from adaperceiver.kernels import attention as tri
    monkeypatch.delenv("ADAPERCEIVER_TRITON_AUTOTUNE", raising=False)
    with _fake_mode():
        q = torch.randn(2, 2, 40, 32, device="cuda")
        assert not tri._tuning_allowed(q)


# ----------------------------------------------------------------------------- compiled CUDA ops
class HostToDevice(TorchDispatchMode):
    """Sees the ATen ops that C++ code runs (a function mode sees only Python calls): each copy of
    a host tensor to a CUDA one and each read of a device value (a sync)."""

    def __init__(self):
        super().__init__()
        self.copies: list[str] = []
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket)
        src = args[1] if name == "aten.copy_" else args[0] if args else None
        dst = args[0] if name == "aten.copy_" else out
        if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) \
                and src.device.type == "cpu" and dst.device.type == "cuda":
            self.copies.append(f"{name} of {tuple(src.shape)}")
        if name in ("aten._local_scalar_dense", "aten.item"):
            self.syncs.append(name)
        return out


def _cuda_ext():
    from adaperceiver import _ext
    if not _ext.available() or not _ext.cuda_available():
        pytest.skip("adaperceiver._C was built without its CUDA part")


# widths used by this test only: the C++ memo (csrc/cuda/index_memo.h) lives as long as the
# process, and another test's fake tensors for the same values would belong to another mode
# (mixed; widest first already; another order of widths: the memo holds orders, not widths)
_FFN_WIDTHS = ([37, 96, 61, 96, 13], [96, 96, 61, 37, 13], [96, 37, 62, 13, 96])


def test_cuda_ffn_backward_second_call_makes_no_host_to_device_copy():
    """The compiled CUDA FFN backward (csrc/cuda/ffn.cu, run on fake CUDA tensors: it launches
    only ATen ops) orders a mixed batch widest first with device permutations from the memo: the
    first call copies them over, a repeated call copies nothing (CUDA-graph safe), other widths
    build their own; widths already in order need no index at all; nothing syncs."""
    from torch._C import DispatchKey, DispatchKeySet
    _cuda_ext()
    op = torch.ops.adaperceiver.matryoshka_ffn_bwd.default
    cuda_kernel = DispatchKeySet(DispatchKey.CUDA)
    B, N, C, Hd = 5, 7, 24, 96
    with _fake_mode():
        x = torch.randn(B, N, C, device="cuda")
        w1, b1 = torch.randn(Hd, C, device="cuda"), torch.randn(Hd, device="cuda")
        w2, b2 = torch.randn(C, Hd, device="cuda"), torch.randn(C, device="cuda")
        go = torch.randn(B, N, C, device="cuda")

        def call(hidden):
            with HostToDevice() as rec:
                grads = op.redispatch(cuda_kernel, go, x, w1, b1, w2, b2, hidden)
            assert [tuple(g.shape) for g in grads] == [(B, N, C), (Hd, C), (Hd,), (C, Hd), (C,)]
            assert all(g.device.type == "cuda" for g in grads)
            assert not rec.syncs, rec.syncs
            return rec.copies

        mixed, in_order, other = _FFN_WIDTHS
        first = call(mixed)
        assert len(first) == 2, first           # the order and its inverse, once
        assert call(mixed) == []                # the second call: from the memo
        assert call(in_order) == []             # widest first already: rows used in place
        assert len(call(other)) == 2            # another order: built (keyed by value)


def _cuda_source(name):
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "csrc", "cuda", name)) as f:
        return f.read()


def _body(src, start):
    """The brace-matched body that follows the first occurrence of ``start``."""
    i = src.index("{", src.index(start))
    depth = 0
    for j in range(i, len(src)):
        depth += {"{": 1, "}": -1}.get(src[j], 0)
        if depth == 0:
            return src[i:j + 1]
    raise AssertionError(f"unbalanced braces after {start!r}")


def test_cuda_attention_rotates_k_once_per_row_before_the_forward():
    """csrc/cuda/attention.cu (no GPU runs it here, so its structure is what can be checked):
    the forward kernel's only argument carries q's RoPE tables and none for K, the kernel reads
    no table but q's, and the forward's host side runs the rope_rows pre-pass on K (once, one
    thread per (row, pair) of each (batch, head): every key row rotated once per call) before
    launching it with the rotated copy. The backward reads q and k through the same pre-pass
    and rotates dq and dk back with the inverse rotation (sign -1)."""
    import re
    src = _cuda_source("attention_kernels.cuh") + _cuda_source("attention.cu")
    params = _body(src, "struct Params")
    assert "q_cos" in params and "q_sin" in params
    assert not re.search(r"k_(cos|sin)", params), params
    fwd = _body(src, "attn_fwd_kernel(Params p)")
    tables = set(re.findall(r"p\.(\w*(?:cos|sin)\w*)", fwd))
    assert tables == {"q_cos", "q_sin"}, tables
    # the pre-pass: (batch * head, row tiles) blocks; a thread's (row, pair) items, each once
    rope = _body(src, "rope_rows_kernel(RopeParams p)")
    assert "for (int e = threadIdx.x; e < kRopeRows * half; e += kRopeThreads)" in rope
    assert "n0 = blockIdx.y * kRopeRows" in rope and "bh = blockIdx.x" in rope
    assert "grid_of(B * H, N, kRopeRows)" in _body(src, "at::Tensor rope_rows(")
    run = _body(src, "void run_fwd(")
    assert run.count("rope_rows(") == 1 and re.search(r"rope_rows\(k, k_cos", run), run
    assert re.search(r"Params p\{[^}]*kr\.data_ptr\(\)", run), run
    bwd = _body(src, "attention_bwd(")
    assert "rope_ref" not in src and "at::stack" not in src      # no per-call ATen rotation
    assert re.search(r"qf = float2_aligned\(rotated\(q, q_cos, q_sin, Nq, at::kFloat\)\)", bwd)
    # k as the forward read it (rounded to the input dtype)
    assert re.search(r"kf = float2_aligned\(rotated\(k, k_cos, k_sin, Nk, T\)\)", bwd)
    assert "-1.f" in _body(bwd, "const auto unrotated")
    assert re.search(r"unrotated\(dq, q_cos, q_sin, Nq\), unrotated\(dk, k_cos, k_sin, Nk\)", bwd)


# ----------------------------------------------------------------------------- registers / spills
def _root():
    import os
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _committed_resources():
    import os
    rows = []
    with open(os.path.join(_root(), "benchmarks", "nvcc_resources.txt")) as f:
        for line in f:
            if line.startswith("#") or line.startswith("arch") or not line.strip():
                continue
            arch, regs, stack, st, ld, smem, kernel = line.split(None, 6)
            rows.append(dict(arch=arch, regs=int(regs), stack=int(stack), spill_st=int(st),
                             spill_ld=int(ld), smem=int(smem), kernel=kernel.strip()))
    return rows


def _expected_kernels():
    """Every kernel instance the CUDA ops launch (csrc/cuda/attention.cu and ffn.cu)."""
    types = ("float", "__half", "__nv_bfloat16")
    want = set()
    for d in (32, 64, 128):
        want |= {f"attn_fwd_kernel<{t}, {d}>" for t in types}
        want |= {f"attn_bwd_dq_kernel<{d}>", f"attn_bwd_dkv_kernel<{d}>"}
    want |= {f"rope_rows_kernel<{t}, {t}, {t}>" for t in types}                   # K, forward
    want |= {f"rope_rows_kernel<{t}, float, {r}>" for t in types[1:] for r in ("float", t)}
    want |= {f"rope_rows_kernel<float, {t}, float>" for t in types[1:]}           # dq, dk back
    want |= {f"fc1_gelu_kernel<{t}>" for t in types} | {f"fc2_kernel<{t}>" for t in types}
    return want


def _short(kernel: str) -> str:
    import re
    name = re.sub(r"^void (\(anonymous namespace\)::|adaperceiver::cuda::)*", "", kernel)
    name = re.sub(r"adaperceiver::cuda::|\(anonymous namespace\)::", "", name)
    return name.split("(")[0]


def _check_resources(rows):
    by_arch = {}
    for r in rows:
        by_arch.setdefault(r["arch"], set()).add(_short(r["kernel"]))
    assert set(by_arch) == {"sm_80", "sm_90"}, set(by_arch)
    for arch, names in by_arch.items():
        assert names == _expected_kernels(), (arch, names ^ _expected_kernels())
    spills = [(r["arch"], r["kernel"], r["spill_st"], r["spill_ld"]) for r in rows
              if r["spill_st"] or r["spill_ld"]]
    assert not spills, spills
    assert all(r["regs"] <= 255 and r["smem"] <= 48 * 1024 for r in rows)


def test_committed_resource_table_lists_every_kernel_without_spills():
    """benchmarks/nvcc_resources.txt (csrc/cuda/nvcc_resources.py's output) lists every kernel
    instance the CUDA ops launch, for sm_80 and sm_90, and none spills."""
    _check_resources(_committed_resources())


@pytest.mark.slow
def test_cuda_kernels_compile_for_sm80_sm90_without_spills():
    """Recompiles csrc/cuda/*.cu as the extension does (nvcc -Xptxas -v, sm_80 and sm_90): the
    same kernel set as the committed table, none spilling."""
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location(
        "nvcc_resources", os.path.join(_root(), "csrc", "cuda", "nvcc_resources.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    nvcc = mod.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    _check_resources(mod.resources(nvcc))


# ----------------------------------------------------------------------------- kernels on the host
# csrc/cuda/attention_kernels.cuh compiled for the host (csrc/cuda/emulation/cuda_on_host.h: a
# block's threads as std::threads, barriers, warp shuffles) and launched as attention.cu launches
# them (emulation/attention_main.cc): the fp32 instances' indexing, masking, RoPE pre-pass, row
# groups and backward run here against a float64 reference.
@pytest.fixture(scope="module")
def attention_on_host(tmp_path_factory):
    import os
    import shutil
    import subprocess
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    exe = tmp_path_factory.mktemp("emu") / "attention_main"
    src = os.path.join(_root(), "csrc", "cuda", "emulation", "attention_main.cc")
    r = subprocess.run([cxx, "-std=c++20", "-O2", "-pthread", src, "-o", str(exe)],
                       capture_output=True, text=True)
    if r.returncode and ("<barrier>" in r.stderr or "unrecognized command-line option" in r.stderr
                         or "_Float16" in r.stderr):
        pytest.skip(f"{cxx} lacks C++20 <barrier> or _Float16: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    return str(exe)


def _row_end(n, grans, n_k):
    if grans is None:
        return torch.full((n,), n_k, dtype=torch.int32)
    ends = [g for g in grans if g <= n]
    if not ends or ends[-1] < n:
        ends.append(n)
    return torch.tensor([min(e for e in ends if e > i) for i in range(n)], dtype=torch.int32)


def _rotate(x, tables):
    c, s = tables
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2)


def _dense_reference(q, k, v, re, lens, scale, q_rope, k_rope):
    """float64 (out, lse) of padded (B, H, N, D) inputs and the autograd graph behind out."""
    B, _, Nq, _ = q.shape
    Nk = k.shape[2]
    qr = _rotate(q, q_rope) if q_rope else q
    kr = _rotate(k, k_rope) if k_rope else k
    s = qr @ kr.transpose(-1, -2) * scale
    i, j = torch.arange(Nq)[:, None], torch.arange(Nk)[None, :]
    n = torch.tensor(lens if lens is not None else [max(Nq, Nk)] * B)[:, None, None, None]
    allowed = (j < re[:, None].long()) & (i < n) & (j < n)
    seen = allowed.any(-1, keepdim=True)
    s = torch.where(seen, s.masked_fill(~allowed, float("-inf")), 0.0)
    lse = torch.logsumexp(s, -1).masked_fill(~seen[..., 0], float("-inf"))
    p = torch.softmax(s, -1) * allowed
    return p @ v, lse


def _run_on_host(exe, tmp, cfg, arrays):
    import subprocess
    import numpy as np
    for name, t in arrays.items():
        t.detach().contiguous().numpy().tofile(tmp / f"{name}.bin")
    (tmp / "cfg.txt").write_text(" ".join(str(c) for c in cfg))
    r = subprocess.run([exe, str(tmp)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return lambda name, shape: torch.from_numpy(
        np.fromfile(tmp / f"{name}.bin", dtype=np.float32).reshape(shape)).double()


def _tables(n, D, gen):
    theta = torch.rand(n, D // 2, generator=gen, dtype=torch.float64) * 6.3
    return theta.cos(), theta.sin()


@pytest.mark.parametrize("case", [
    dict(B=2, H=3, Nq=70, Nk=70, D=32, grans=[1, 5, 40, 65], lens=[70, 33], rope="qk"),
    dict(B=2, H=2, Nq=97, Nk=97, D=64, grans=[16, 64], lens=[97, 0], rope="k"),
    dict(B=1, H=2, Nq=45, Nk=77, D=128, grans=None, lens=None, rope="q"),
], ids=["d32_grans_lens_rope", "d64_empty_sample_k_rope", "d128_cross_q_rope"])
def test_cuda_attention_kernels_on_host_match_float64(attention_on_host, tmp_path, case):
    """Forward (K through the RoPE pre-pass) and backward (dq, dk rotated back) of the fp32
    kernels equal the float64 reference: rows past a length write zeros / lse -inf, tails of
    the 64-row tiles and 32-key tiles, D / 32 lanes per row (1, 2, 4)."""
    gen = torch.Generator().manual_seed(sum(map(ord, str(case))))
    B, H, Nq, Nk, D = case["B"], case["H"], case["Nq"], case["Nk"], case["D"]
    q, go = (torch.randn(B, H, Nq, D, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, H, Nk, D, generator=gen, dtype=torch.float64) for _ in range(2))
    q32, k32, v32, go32 = (t.float() for t in (q, k, v, go))
    q, k, v = (t.float().double().requires_grad_() for t in (q, k, v))   # the fp32 inputs
    q_rope = _tables(Nq, D, gen) if "q" in case["rope"] else None
    k_rope = _tables(Nk, D, gen) if "k" in case["rope"] else None
    re, scale = _row_end(Nq, case["grans"], Nk), D ** -0.5
    arrays = dict(q=q32, k=k32, v=v32, go=go32, row_end=re)
    if case["lens"] is not None:
        arrays["lens"] = torch.tensor(case["lens"], dtype=torch.int32)
    for name, tab in (("q", q_rope), ("k", k_rope)):
        if tab is not None:
            arrays[f"{name}_cos"], arrays[f"{name}_sin"] = (t.float() for t in tab)
    cfg = (B, H, Nq, Nk, D, repr(scale), int(q_rope is not None), int(k_rope is not None),
           int(case["lens"] is not None), 0, 1, 0)
    got = _run_on_host(attention_on_host, tmp_path, cfg, arrays)
    tables = lambda t: tuple(x.float().double() for x in t) if t else None   # noqa: E731
    out, lse = _dense_reference(q, k, v, re, case["lens"], scale, tables(q_rope), tables(k_rope))
    dq, dk, dv = torch.autograd.grad((out * go32.double()).sum(), (q, k, v))
    for name, want, shape in (("out", out, (B, H, Nq, D)), ("dq", dq, (B, H, Nq, D)),
                              ("dk", dk, (B, H, Nk, D)), ("dv", dv, (B, H, Nk, D))):
        have = got(name, shape)
        assert not have.isnan().any(), name              # every element written, no NaN
        err = (have - want.detach()).abs().max().item()
        assert err <= 1e-4 * max(1.0, want.abs().max().item()), (name, err)
    have = got("lse", (B, H, Nq))
    want = lse.detach()
    assert torch.equal(have.isinf(), want.isinf()) and (have[want.isinf()] < 0).all()
    fin = ~want.isinf()
    assert (have[fin] - want[fin]).abs().max().item() <= 1e-4


def test_cuda_packed_attention_kernels_on_host_match_float64(attention_on_host, tmp_path):
    """The packed-rows forward (samples of their own lengths one after another, one of them
    empty): each sample equals the padded float64 reference of its rows."""
    gen = torch.Generator().manual_seed(7)
    lens, H, D, grans = [50, 17, 0, 64], 2, 64, [8, 32, 64]
    B, N, R = len(lens), max(lens), sum(lens)
    q, k, v = (torch.randn(R, H, D, generator=gen).double() for _ in range(3))
    q_rope, k_rope = _tables(N, D, gen), _tables(N, D, gen)
    re = _row_end(N, grans, N)
    starts = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)[:-1]), dtype=torch.int32)
    arrays = dict(q=q.float(), k=k.float(), v=v.float(), row_end=re,
                  lens=torch.tensor(lens, dtype=torch.int32), starts=starts,
                  q_cos=q_rope[0].float(), q_sin=q_rope[1].float(), k_cos=k_rope[0].float(),
                  k_sin=k_rope[1].float())
    cfg = (B, H, R, N, D, repr(D ** -0.5), 1, 1, 1, 1, 0, 0)
    got = _run_on_host(attention_on_host, tmp_path, cfg, arrays)
    out = got("out", (R, H, D))
    assert not out.isnan().any()                          # every row written
    lse = got("lse", (B, H, N))
    tables = lambda t: tuple(x.float().double() for x in t)   # noqa: E731
    for b, (s0, n) in enumerate(zip(starts.tolist(), lens)):
        if n == 0:
            assert (lse[b] == float("-inf")).all()
            continue
        pad = lambda x: torch.zeros(1, H, N, D, dtype=torch.float64).index_copy(  # noqa: E731
            2, torch.arange(n), x[s0:s0 + n].transpose(0, 1)[None])
        want, want_lse = _dense_reference(pad(q), pad(k), pad(v), re, [n], D ** -0.5,
                                          tables(q_rope), tables(k_rope))
        have = out[s0:s0 + n].transpose(0, 1)
        assert (have - want[0, :, :n]).abs().max().item() <= 1e-4
        assert (lse[b, :, :n] - want_lse[0, :, :n]).abs().max().item() <= 1e-4
        assert (lse[b, :, n:] == float("-inf")).all()


def test_every_cuda_launch_is_on_torchs_stream_and_checked():
    """Each kernel launch in csrc/cuda/*.cu names its stream (torch's current one: a launch
    without it would go to the legacy default stream, outside torch's stream order and outside
    a CUDA-graph capture) and is followed, in its function, by C10_CUDA_KERNEL_LAUNCH_CHECK (a
    bad configuration raises at its launch, not at a later unrelated call)."""
    import glob
    import os
    import re
    launches = 0
    for path in sorted(glob.glob(os.path.join(_root(), "csrc", "cuda", "*.cu"))):
        src = open(path).read()
        for m in re.finditer(r"<<<(.*?)>>>", src, re.S):
            launches += 1
            args, depth, cur = [], 0, ""
            for ch in m.group(1):                    # split at top-level commas
                depth += {"(": 1, ")": -1}.get(ch, 0)
                if ch == "," and depth == 0:
                    args, cur = args + [cur.strip()], ""
                else:
                    cur += ch
            args.append(cur.strip())
            where = f"{os.path.basename(path)}: <<<{m.group(1)}>>>"
            assert len(args) == 4 and args[3] == "stream", where
            fn_rest = src[m.end():src.index("\n}\n", m.end())]     # to the function's end
            assert "C10_CUDA_KERNEL_LAUNCH_CHECK();" in fn_rest, where
        streams = re.findall(r"cudaStream_t stream|auto stream = (.*);", src)
        assert all(s in ("", "c10::cuda::getCurrentCUDAStream()") for s in streams), streams
    assert launches >= 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_attention_kernels_on_host_low_precision(attention_on_host, tmp_path, dtype):
    """The fp16 / bf16 instances (K rotated and rounded to the dtype by the pre-pass, outputs
    and gradients stored in the dtype) within flash-attn's rule: error vs float64 at most twice
    that of the plain PyTorch reference in the same dtype, plus a small floor."""
    gen = torch.Generator().manual_seed(11 + int(dtype == torch.bfloat16))
    B, H, N, D, grans, lens = 2, 2, 70, 64, [1, 5, 40, 65], [70, 41]
    q, k, v, go = (torch.randn(B, H, N, D, generator=gen).to(dtype) for _ in range(4))
    q_rope, k_rope = _tables(N, D, gen), _tables(N, D, gen)
    re, scale = _row_end(N, grans, N), D ** -0.5
    arrays = dict(q=q.float(), k=k.float(), v=v.float(), go=go.float(), row_end=re,
                  lens=torch.tensor(lens, dtype=torch.int32))
    for name, tab in (("q", q_rope), ("k", k_rope)):
        arrays[f"{name}_cos"], arrays[f"{name}_sin"] = (t.float() for t in tab)
    code = {torch.float16: 1, torch.bfloat16: 2}[dtype]
    got = _run_on_host(attention_on_host, tmp_path,
                       (B, H, N, N, D, repr(scale), 1, 1, 1, 0, 1, code), arrays)

    def grads(work):
        x = [t.to(work).requires_grad_() for t in (q, k, v)]
        tabs = tuple(tuple(c.float().to(work) for c in t) for t in (q_rope, k_rope))
        out, _ = _dense_reference(*x, re, lens, scale, *tabs)
        return [out] + list(torch.autograd.grad((out * go.to(work)).sum(), x))

    exact = grads(torch.float64)
    plain = grads(dtype)
    shapes = (B, H, N, D)
    for name, want, ref in zip(("out", "dq", "dk", "dv"), exact, plain):
        have = got(name, shapes)
        assert not have.isnan().any(), name
        err = (have - want.detach()).abs().max().item()
        ref_err = (ref.detach().double() - want.detach()).abs().max().item()
        floor = 1e-4 * want.abs().max().item()
        assert err <= 2 * ref_err + floor, (name, err, ref_err)
