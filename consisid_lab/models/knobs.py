"""Speed knobs for sampling: each a config value (``sampling.knobs`` of ``generate`` and of ``model.sampling``),
checked against the hardware before any model is loaded, applied for the duration of one sampling call and
undone afterwards (validation samples from the training model itself).

Exact knobs (same numbers):

- ``identity_kv_cache``: the identity tokens' cross-attention keys and values computed once per video (on the
  first step, under the same dtype and autocast as every later step), not once per step. Bitwise identical.
- ``attention: math | flash | efficient | cudnn``: the ``scaled_dot_product_attention`` kernel
  (``torch.nn.attention.sdpa_kernel``). Same function, other kernels: a float reassociation.

Knobs exact up to float reassociation (the bound is measured in ``tests/test_knobs.py`` and
``benchmarks/bench_knobs.py``; below 1e-4 max abs on the decoded float32 video at the tiny sizes):

- ``cfg_batching``: conditional and unconditional branches in one batch of 2B.
- ``fuse_qkv``: one ``to_qkv`` projection instead of ``to_q``, ``to_k``, ``to_v`` (diffusers'
  ``fuse_qkv_projections`` and ``FusedCogVideoXAttnProcessor2_0``).
- ``compile``: regional ``torch.compile`` of each DiT block (``nn.Module.compile`` in place, so the state-dict keys
  stay the same); needs a C++ compiler on the CPU, Triton on CUDA.

Approximate knobs (off by default; their identity cost is what ``benchmarks/bench_knobs.py`` measures):

- ``step_cache``: a first-block residual cache with TeaCache-style accumulation (:class:`StepCache`): a threshold
  in [0, 1] on the accumulated relative L1 change of the first block's output; below it the remaining blocks are
  skipped and their last residual reused.
- ``quantize: int8 | fp8``: the DiT blocks' linears through ``torchao`` (int8 weight-only on any device; FP8
  dynamic activations and weights on a CUDA GPU of compute capability >= 8.9).
- ``attention: sage | flash3``: SageAttention (8-bit QK) / FlashAttention-3 (Hopper) through their packages.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SDPA_BACKENDS = ("math", "flash", "efficient", "cudnn")
PACKAGE_BACKENDS = {"sage": "sageattention", "flash3": "flash_attn_interface"}
ATTENTION_BACKENDS = ("default", *SDPA_BACKENDS, *PACKAGE_BACKENDS)
CPU_SDPA = ("math", "flash")  # the sdpa kernels torch has on the CPU
QUANTIZE = (None, "int8", "fp8")
STEP_CACHE_RANGE = (0.0, 1.0)


class KnobUnavailable(RuntimeError):
    """A knob this machine cannot run; the message names the requirement and the nearest knob that works."""


@dataclass(frozen=True)
class SamplingKnobs:
    """The sampling knobs; the defaults reproduce the exact sampler (plus the bitwise-exact K/V cache)."""

    attention: str = "default"
    fuse_qkv: bool = False
    identity_kv_cache: bool = True
    cfg_batching: bool = False
    step_cache: float | None = None
    compile: bool = False
    quantize: str | None = None

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"sampling.knobs.attention={self.attention!r} is unknown; pick one of {list(ATTENTION_BACKENDS)}"
            )
        if self.quantize not in QUANTIZE:
            raise ValueError(f"sampling.knobs.quantize={self.quantize!r} is unknown; pick one of {list(QUANTIZE)}")
        if self.step_cache is not None:
            check_threshold(self.step_cache)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | SamplingKnobs | None) -> SamplingKnobs:
        if isinstance(cfg, SamplingKnobs):
            return cfg
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown sampling.knobs {unknown}; known: {sorted(known)}")
        return cls(**cfg)

    @property
    def exact(self) -> bool:
        """True when the knobs keep the exact sampler's numbers bit for bit."""
        return self == SamplingKnobs(identity_kv_cache=self.identity_kv_cache)

    def check(self, device: torch.device | str) -> None:
        """Refuse (before any model is loaded) a knob this machine cannot run, naming what it needs and the
        nearest knob that works here."""
        device = torch.device(device)
        check_attention(self.attention, device)
        if self.quantize is not None:
            check_quantize(self.quantize, device)
        if self.compile:
            check_compile(device)


def check_threshold(threshold: float) -> float:
    lo, hi = STEP_CACHE_RANGE
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not lo <= threshold <= hi:
        raise ValueError(
            f"sampling.knobs.step_cache={threshold!r} is outside [{lo}, {hi}]: the threshold on the accumulated "
            "relative L1 change of the first block's output (0 computes every step, about 0.05-0.3 skips some; "
            "null switches the cache off)"
        )
    return float(threshold)


def check_attention(name: str, device: torch.device) -> None:
    if name in PACKAGE_BACKENDS:
        package = PACKAGE_BACKENDS[name]
        if device.type != "cuda":
            raise KnobUnavailable(
                f"sampling.knobs.attention={name} needs a CUDA GPU and the `{package}` package; on {device.type} "
                f"use attention={'flash' if device.type == 'cpu' else 'math'} (torch's sdpa kernels)"
            )
        if importlib.util.find_spec(package) is None:
            pip = {"sageattention": "sageattention", "flash_attn_interface": "flash-attn-3 (flash_attn_interface)"}
            raise KnobUnavailable(
                f"sampling.knobs.attention={name} needs the `{package}` package, which is not installed "
                f"(pip install {pip[package]}); the nearest knob that works: attention=flash (torch's sdpa kernel)"
            )
    elif name in ("efficient", "cudnn") and device.type != "cuda":
        raise KnobUnavailable(
            f"sampling.knobs.attention={name} needs a CUDA GPU (torch has no {name} sdpa kernel on "
            f"{device.type}); on the CPU use attention=flash or attention=math"
        )
    elif name == "cudnn" and torch.backends.cudnn.version() is None:
        raise KnobUnavailable("sampling.knobs.attention=cudnn needs cuDNN in torch; use attention=flash")


def check_quantize(kind: str, device: torch.device) -> None:
    if kind == "fp8":
        if device.type != "cuda":
            raise KnobUnavailable(
                f"sampling.knobs.quantize=fp8 needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper) and "
                f"torchao; on {device.type} use quantize=int8"
            )
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise KnobUnavailable(
                f"sampling.knobs.quantize=fp8 needs compute capability >= 8.9; this GPU has {major}.{minor}: use "
                "quantize=int8"
            )
    if importlib.util.find_spec("torchao") is None:
        raise KnobUnavailable(
            f"sampling.knobs.quantize={kind} needs the `torchao` package (pip install 'consisid_lab[fast]', i.e. "
            "torchao==0.18.0); without it use quantize=null"
        )


def check_compile(device: torch.device) -> None:
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise KnobUnavailable(
            "sampling.knobs.compile=true needs Triton on a CUDA GPU (torch.compile's inductor backend); without it "
            "use compile=false (fuse_qkv and identity_kv_cache need no toolchain)"
        )
    if device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise KnobUnavailable(
            "sampling.knobs.compile=true needs a C++ compiler (g++ or clang++) on the PATH for torch.compile on the "
            "CPU; without one use compile=false"
        )


# ----------------------------------------------------------------------------------------------- identity K/V
@dataclass(eq=False)
class IdentityKV:
    """Identity tokens ``(B, Q, D_kv)`` with their per-layer cross-attention keys and values memoised.

    Passed in place of the tokens (``Conditions.identity_tokens``): the injector computes each layer's K/V on the
    first call and reuses it on later ones with the same batch size and dtype (the first call's dtype and autocast
    state fix the numbers, as they would every step).
    """

    tokens: Tensor
    memo: dict[tuple, tuple[Tensor, Tensor]] = field(default_factory=dict)
    computed: int = 0

    @property
    def shape(self) -> torch.Size:
        return self.tokens.shape

    def kv(self, index: int, batch: int, dtype: torch.dtype, fn: Callable[[Tensor], tuple[Tensor, Tensor]]):
        key = (index, batch, dtype, torch.is_autocast_enabled())
        if key not in self.memo:
            tokens = repeat_batch(self.tokens, batch)
            self.memo[key] = fn(tokens.to(dtype))
            self.computed += 1
        return self.memo[key]


def repeat_batch(x: Tensor, batch: int) -> Tensor:
    """``x (B, ...)`` repeated along the batch to ``batch`` rows (the CFG halves share the identity)."""
    if x.shape[0] == batch:
        return x
    if batch % x.shape[0]:
        raise ValueError(f"cannot repeat a batch of {x.shape[0]} to {batch}")
    return x.repeat(batch // x.shape[0], *([1] * (x.ndim - 1)))


# ----------------------------------------------------------------------------------------------- step cache
@dataclass
class BranchCache:
    """One branch's (cond / uncond / batched) state of the first-block cache."""

    threshold: float
    previous_first: Tensor | None = None
    residual: Tensor | None = None
    accumulated: float = 0.0
    hits: int = 0
    calls: int = 0

    def skip(self, first: Tensor) -> bool:
        """Record the first block's output of this step; True when the remaining blocks may be skipped."""
        self.calls += 1
        prev, self.previous_first = self.previous_first, first.detach()
        if prev is None or self.residual is None or prev.shape != first.shape:
            return False
        change = ((first.float() - prev.float()).abs().mean() / prev.float().abs().mean().clamp_min(1e-12)).item()
        self.accumulated += change
        if self.accumulated < self.threshold:
            self.hits += 1
            return True
        self.accumulated = 0.0
        return False

    def store(self, first: Tensor, last: Tensor) -> None:
        self.residual = (last - first).detach()


class StepCache:
    """First-block residual cache across denoising steps, one :class:`BranchCache` per branch key."""

    def __init__(self, threshold: float) -> None:
        self.threshold = check_threshold(threshold)
        self.branches: dict[str, BranchCache] = {}

    def branch(self, key: str) -> BranchCache:
        return self.branches.setdefault(key, BranchCache(self.threshold))

    @property
    def hits(self) -> int:
        return sum(b.hits for b in self.branches.values())

    @property
    def calls(self) -> int:
        return sum(b.calls for b in self.branches.values())


# ----------------------------------------------------------------------------------------------- attention
class KernelAttnProcessor:
    """CogVideoX joint text-video self-attention with a pluggable attention function (``sage``, ``flash3``);
    the same math as diffusers' ``CogVideoXAttnProcessor2_0`` (and its fused variant when ``to_qkv`` exists)."""

    def __init__(self, attention_fn: Callable[[Tensor, Tensor, Tensor], Tensor]) -> None:
        self.attention_fn = attention_fn

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError("KernelAttnProcessor takes no attention mask (CogVideoX passes none)")
        n_text = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # (B, L + N, D)
        b = x.shape[0]
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        heads = attn.heads
        q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))  # (B, H, S, d)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            q = torch.cat([q[:, :, :n_text], apply_rotary_emb(q[:, :, n_text:], image_rotary_emb)], dim=2)
            if not attn.is_cross_attention:
                k = torch.cat([k[:, :, :n_text], apply_rotary_emb(k[:, :, n_text:], image_rotary_emb)], dim=2)
        out = self.attention_fn(q, k, v)  # (B, H, S, d)
        out = out.transpose(1, 2).reshape(b, -1, heads * q.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out))
        return out[:, n_text:], out[:, :n_text]


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)


def package_attention(name: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The attention function of ``sage`` / ``flash3`` (their packages imported here, after the checks)."""
    if name == "sage":
        from sageattention import sageattn

        return lambda q, k, v: sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    if name == "flash3":
        from flash_attn_interface import flash_attn_func

        def flash3(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False)
            out = out[0] if isinstance(out, tuple) else out  # some releases also return the log-sum-exp
            return out.transpose(1, 2)

        return flash3
    raise ValueError(f"no package attention {name!r}; pick one of {list(PACKAGE_BACKENDS)}")


def _sdpa_backend(name: str) -> Any:
    from torch.nn.attention import SDPBackend

    return {
        "math": SDPBackend.MATH,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }[name]


# ----------------------------------------------------------------------------------------------- applying
def _attention_modules(transformer: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention_processor import Attention

    return [m for m in transformer.modules() if isinstance(m, Attention)]


@contextlib.contextmanager
def fused_qkv(transformer: nn.Module) -> Iterator[None]:
    """diffusers' ``fuse_qkv_projections`` for the duration; afterwards the processors are restored and the
    fused ``to_qkv`` weights dropped (the state dict is the unfused one again)."""
    attns = _attention_modules(transformer)
    processors = [m.processor for m in attns]
    transformer.fuse_qkv_projections()
    try:
        yield
    finally:
        for m, proc in zip(attns, processors):
            m.set_processor(proc)
            for name in ("to_qkv", "to_kv"):
                if hasattr(m, name):
                    delattr(m, name)
            m.fused_projections = False


@contextlib.contextmanager
def kernel_processor(transformer: nn.Module, fn: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Iterator[None]:
    attns = _attention_modules(transformer)
    processors = [m.processor for m in attns]
    proc = KernelAttnProcessor(fn)
    for m in attns:
        m.set_processor(proc)
    try:
        yield
    finally:
        for m, p in zip(attns, processors):
            m.set_processor(p)


@contextlib.contextmanager
def compiled_blocks(blocks: nn.ModuleList, **compile_kwargs: Any) -> Iterator[None]:
    """Regional compile: each DiT block compiled in place (``nn.Module.compile``), the rest stays eager. All blocks
    share one code object, so torch.compile traces one block and reuses it (dynamic=False keeps shapes fixed)."""
    for block in blocks:
        block.compile(**{"dynamic": False, **compile_kwargs})
    try:
        yield
    finally:
        for block in blocks:
            block._compiled_call_impl = None


@contextlib.contextmanager
def quantized_linears(blocks: nn.ModuleList, kind: str) -> Iterator[None]:
    """The blocks' ``nn.Linear`` weights through torchao (int8 weight-only, or FP8 dynamic activations and
    weights) for the duration; the float weights are put back afterwards."""
    from torchao.quantization import quantize_

    if kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        config: Any = Int8WeightOnlyConfig()
    else:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    linears = [m for m in blocks.modules() if isinstance(m, nn.Linear)]
    saved = [(m, m.weight, m.bias) for m in linears]
    for block in blocks:
        quantize_(block, config)
    try:
        yield
    finally:
        for m, w, b in saved:
            m.weight, m.bias = w, b


@contextlib.contextmanager
def applied(knobs: SamplingKnobs, denoiser: nn.Module, device: torch.device | str) -> Iterator[None]:
    """The module-level knobs (attention kernel, fused QKV, compile, quantize) for one sampling call."""
    knobs.check(device)
    transformer = denoiser.backbone.transformer
    blocks = denoiser.backbone.blocks
    with contextlib.ExitStack() as stack:
        if knobs.attention in SDPA_BACKENDS:
            from torch.nn.attention import sdpa_kernel

            stack.enter_context(sdpa_kernel(_sdpa_backend(knobs.attention)))
        if knobs.fuse_qkv:
            stack.enter_context(fused_qkv(transformer))
        if knobs.attention in PACKAGE_BACKENDS:
            stack.enter_context(kernel_processor(transformer, package_attention(knobs.attention)))
        if knobs.quantize is not None:
            stack.enter_context(quantized_linears(blocks, knobs.quantize))
        if knobs.compile:
            stack.enter_context(compiled_blocks(blocks))
        yield
