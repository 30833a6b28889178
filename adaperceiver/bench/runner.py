"""Running a benchmark: build the model and baselines, time every configuration, make rows."""
from __future__ import annotations

import contextlib
import gc
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .grid import Config
from .timing import Timing, time_step

__all__ = ["PRECISIONS", "Precision", "parse_precision", "RunSettings", "model_config",
           "build_model", "resolved_backend", "adaperceiver_step", "baseline_step",
           "time_adaperceiver", "time_baseline", "make_row"]


@dataclass(frozen=True)
class Precision:
    name: str                       # canonical: float32, float16, bfloat16, amp_float16, ...
    dtype: torch.dtype              # dtype of weights and input
    amp_dtype: Optional[torch.dtype]  # autocast dtype, or None

    @property
    def bytes_per_el(self) -> int:
        d = self.amp_dtype or self.dtype
        return torch.empty((), dtype=d).element_size()


PRECISIONS = {
    "float32": Precision("float32", torch.float32, None),
    "float16": Precision("float16", torch.float16, None),
    "bfloat16": Precision("bfloat16", torch.bfloat16, None),
    "amp_float16": Precision("amp_float16", torch.float32, torch.float16),
    "amp_bfloat16": Precision("amp_bfloat16", torch.float32, torch.bfloat16),
}
_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
            "amp_fp16": "amp_float16", "amp_bf16": "amp_bfloat16"}


def parse_precision(name: str, amp: bool = False, amp_dtype: str = "bfloat16") -> Precision:
    """timm-like: ``--precision`` float32/float16/bfloat16/amp/amp_float16/amp_bfloat16 (fp32,
    fp16, bf16 aliases); ``--amp`` overrides it with autocast at ``--amp-dtype``."""
    allowed = ", ".join(list(PRECISIONS) + ["amp"] + list(_ALIASES))
    if amp or name == "amp":
        name = f"amp_{_ALIASES.get(amp_dtype, amp_dtype)}"
        if name not in PRECISIONS:
            raise ValueError(f"--amp-dtype {amp_dtype!r} is not allowed; allowed: float16, "
                             "bfloat16")
    name = _ALIASES.get(name, name)
    if name not in PRECISIONS:
        raise ValueError(f"--precision {name!r} is not allowed; allowed: {allowed}")
    return PRECISIONS[name]


@dataclass
class RunSettings:
    batch_size: int = 4
    img_size: int = 224
    precision: Precision = PRECISIONS["float32"]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    warmup: int = 1
    rounds: int = 5
    min_rounds: int = 3
    budget_s: Optional[float] = 15.0
    torchcompile: Optional[str] = None

    def autocast(self):
        if self.precision.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision.amp_dtype)

    def images(self, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(self.batch_size, 3, self.img_size, self.img_size, generator=g)
        return x.to(device=self.device, dtype=self.precision.dtype)


def model_config(name: str, overrides: dict):
    """The model's config without building it (fast; validates the overrides)."""
    from adaperceiver.config import AdaPerceiverConfig
    from adaperceiver.registry import MODEL_CONFIGS, list_models
    if name not in MODEL_CONFIGS:
        raise ValueError(f"--model {name!r} is not known; allowed: {', '.join(list_models())}")
    d = {**AdaPerceiverConfig().to_dict(), **MODEL_CONFIGS[name], **overrides}
    try:
        return AdaPerceiverConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--model-kwargs {overrides}: {e}") from None


def build_model(name: str, overrides: dict, settings: RunSettings, pretrained=False):
    import adaperceiver
    model = adaperceiver.create_model(name, pretrained=pretrained or False, **overrides)
    return model.eval().to(device=settings.device, dtype=settings.precision.dtype)


def compile_model(model, backend: Optional[str], n_variants: int = 1):
    """``torch.compile(model, backend=backend)``, or the model itself when backend is empty;
    dynamo's recompile limit raised to n_variants graphs (one per (t, w, l))."""
    if not backend:
        return model
    import torch._dynamo as dynamo
    # one graph per (t, w, l): raise the recompile limit so none falls back to eager silently
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, key):
            setattr(dynamo.config, key, max(getattr(dynamo.config, key), 4 * n_variants + 8))
    return torch.compile(model, backend=backend)


def backend_context(backend: str):
    from adaperceiver import use_backend
    return contextlib.nullcontext() if backend == "auto" else use_backend(backend)


def resolved_backend(model, backend: str, settings: RunSettings, cfg: Config) -> str:
    """Which ops backend runs (``auto`` resolved), found by asking the dispatcher about inputs
    shaped like the model's (``model``: the model or its config); ``attention=a,ffn=b`` when
    the two ops differ, ``none (reason)`` when no backend can run them."""
    from adaperceiver.ops import dispatch
    from adaperceiver.ops.inputs import AttentionInputs, FfnInputs
    c = getattr(model, "config", model)
    dev, dt = settings.device, settings.precision.amp_dtype or settings.precision.dtype
    hd = c.embed_dim // c.num_heads
    q = torch.zeros(1, c.num_heads, cfg.t, hd, device=dev, dtype=dt)
    x = torch.zeros(1, cfg.t, c.embed_dim, device=dev, dtype=dt)
    hmax = c.ffn_hidden
    w1 = torch.zeros(hmax, c.embed_dim, device=dev, dtype=dt)
    b1 = torch.zeros(hmax, device=dev, dtype=dt)
    w2 = torch.zeros(c.embed_dim, hmax, device=dev, dtype=dt)
    b2 = torch.zeros(c.embed_dim, device=dev, dtype=dt)
    grans = list(c.mask_token_grans)
    names = {}
    with backend_context(backend):
        for op, build in (("attention", lambda: AttentionInputs.build(q, q, q, grans)),
                          ("ffn", lambda: FfnInputs.build(x, w1, b1, w2, b2,
                                                          int(cfg.w * c.ffn_ratio)))):
            try:
                mod = dispatch.select(op, build())
                names[op] = mod.__name__.rsplit(".", 1)[-1].replace("_backend", "")
            except Exception as e:  # noqa: BLE001 - reported to the user
                names[op] = f"none ({' '.join(str(e).split())})"
    if names["attention"] == names["ffn"]:
        return names["attention"]
    return f"attention={names['attention']},ffn={names['ffn']}"


def adaperceiver_step(model, cfg: Config, x: torch.Tensor, settings: RunSettings,
                      backend: str = "auto"):
    """One forward of one batch at ``cfg`` on ``backend``, as a closure."""
    def step():
        with torch.inference_mode(), backend_context(backend), settings.autocast():
            return model(x, num_tokens=cfg.t, mat_dim=cfg.w, depth=cfg.l).logits
    return step


def baseline_step(model, x: torch.Tensor, settings: RunSettings):
    def step():
        with torch.inference_mode(), settings.autocast():
            return model(x)
    return step


def time_adaperceiver(model, cfg: Config, x: torch.Tensor, settings: RunSettings,
                      backend: str = "auto") -> Timing:
    return time_step(adaperceiver_step(model, cfg, x, settings, backend), settings.device,
                     warmup=settings.warmup, rounds=settings.rounds,
                     min_rounds=settings.min_rounds, budget_s=settings.budget_s)


def time_baseline(model, x: torch.Tensor, settings: RunSettings) -> Timing:
    return time_step(baseline_step(model, x, settings), settings.device,
                     warmup=settings.warmup, rounds=settings.rounds,
                     min_rounds=settings.min_rounds, budget_s=settings.budget_s)


def make_row(kind: str, name: str, config: str, timing: Timing, settings: RunSettings, *,
             gflops: float, params: int, gflops_needed: Optional[float] = None,
             cfg: Optional[Config] = None, backend: Optional[str] = None) -> dict:
    s = timing.summary()
    return {
        "kind": kind, "name": name, "config": config,
        "t": cfg.t if cfg else None, "w": cfg.w if cfg else None, "l": cfg.l if cfg else None,
        "backend": backend, "batch_size": settings.batch_size, "img_size": settings.img_size,
        "precision": settings.precision.name, "device": str(settings.device),
        "threads": torch.get_num_threads(), "torchcompile": settings.torchcompile,
        "gflops": gflops, "gflops_needed": gflops_needed if gflops_needed is not None else gflops,
        "params": params, "img_per_s": settings.batch_size / (s["ms_median"] / 1e3),
        "ms_per_step": s["ms_median"], "ms_min": s["ms_min"], "ms_max": s["ms_max"],
        "ms_stdev": s["ms_stdev"], "spread_pct": s["spread_pct"], "rounds": s["rounds"],
        "warmup": s["warmup"], "timer": s["timer"], "speedup": None, "speedup_baseline": None,
        "times_ms": s["times_ms"],
    }


def release_memory() -> None:
    """Collect garbage (call after dropping the last reference to a model)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def now() -> float:
    return time.perf_counter()
