"""Injectors: how identity tokens enter the video DiT (the high-frequency route).

The backbone asks an injector two things per block ``i``: ``has(i, position)`` (is there an injection at this
place?) and ``injector(i, video_tokens, identity_tokens)`` (the residual to add there). Positions:

- ``after_block``: added to the residual stream after the whole block (the released ConsisID code; the paper's
  plan e);
- ``between_attn_ffn``: added after the attention residual, before ``norm2`` and the feed-forward (the paper's
  plan c, "inside the attention block");
- ``attn_input``: added to the video tokens entering ``norm1`` and the attention, the residual stream keeping
  the block's input (the paper's plan f, reported to destabilise training). Adding it to the residual stream
  as well would equal the previous block's ``after_block`` injection.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from consisid_lab.models.knobs import IdentityKV


def _backbone_sites() -> tuple[str, ...]:
    # The sites are declared by the backbone (consisid_lab.models.backbone.INJECTION_SITES); imported late, the
    # backbone module imports this one.
    from consisid_lab.models.backbone import INJECTION_SITES

    return INJECTION_SITES


class PerceiverAttention(nn.Module):
    """Perceiver-style multi-head attention with LayerNormed queries and context.

    ``context_includes_queries=True`` is the Perceiver resampler layer (keys/values over ``[context; queries]``,
    used by the fuser); ``False`` is the identity cross-attention of the injector (keys/values over the
    context only). Parameters and numerics follow ConsisID's ``PerceiverAttention`` /
    ``PerceiverCrossAttention``: the ``1/sqrt(d)`` scale is split as ``d**-0.25`` on both q and k (steadier in
    half precision than scaling the product) and the softmax runs in float32.
    """

    def __init__(
        self,
        dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        context_includes_queries: bool = True,
    ) -> None:
        super().__init__()
        context_dim = dim if context_dim is None else context_dim
        if context_includes_queries and context_dim != dim:
            raise ValueError(
                f"a Perceiver layer that attends over [context; queries] needs context_dim == dim, got "
                f"context_dim={context_dim}, dim={dim}; project the context to {dim} first"
            )
        self.heads = heads
        self.dim_head = dim_head
        self.context_includes_queries = context_includes_queries
        inner = heads * dim_head
        self.norm_context = nn.LayerNorm(context_dim)
        self.norm_queries = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values ``(B, H, M, d)`` of a context alone (cross-attention, ``context_includes_queries``
        false): they do not depend on the queries, so a sampler may compute them once per video."""
        if self.context_includes_queries:
            raise ValueError("a Perceiver layer over [context; queries] has no query-independent keys and values")
        b = context.shape[0]
        k, v = self.to_kv(self.norm_context(context)).chunk(2, dim=-1)  # (B, M, H*d) each
        return (
            k.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2),
            v.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2),
        )

    def forward(self, context: Tensor | None, queries: Tensor, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``context (B, M, D_c)``, ``queries (B, N, D)`` -> ``(B, N, D)`` (the residual, not yet added).

        ``kv``: the context's keys and values from :meth:`context_kv` (then ``context`` is not read).
        """
        queries = self.norm_queries(queries)
        b, n, _ = queries.shape
        q = self.to_q(queries)  # (B, N, H*d)
        q = q.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2)  # (B, H, N, d)
        if kv is not None:
            k, v = kv
        elif self.context_includes_queries:
            kv_input = torch.cat([self.norm_context(context), queries], dim=1)
            k, v = self.to_kv(kv_input).chunk(2, dim=-1)  # (B, M+N, H*d) each
            k = k.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2)
            v = v.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2)
        else:
            k, v = self.context_kv(context)
        s = 1.0 / math.sqrt(math.sqrt(self.dim_head))
        w = (q * s) @ (k * s).transpose(-2, -1)  # (B, H, N, M)
        w = torch.softmax(w.float(), dim=-1).to(w.dtype)
        out = (w @ v).permute(0, 2, 1, 3).reshape(b, n, -1)  # (B, N, H*d)
        return self.to_out(out)


class Injector(nn.Module):
    """Interface. ``has`` is cheap and pure; ``forward`` returns the residual to add at that place.

    Declared: ``positions`` (the backbone sites it uses, checked by ``VideoDiT.set_injector``), ``num_layers``
    (the block count it was built for; ``None``: any), ``frozen``.
    """

    positions: tuple[str, ...] = ()
    num_layers: int | None = None
    frozen: bool = False

    def has(self, index: int, position: str) -> bool:
        raise NotImplementedError

    def forward(self, index: int, video_tokens: Tensor, identity_tokens: Tensor) -> Tensor:
        raise NotImplementedError


class NoInjector(Injector):
    """No high-frequency route: the backbone alone."""

    def __init__(self, **_: object) -> None:
        # Accepts (and ignores) the sizes the composition passes to every injector.
        super().__init__()

    def has(self, index: int, position: str) -> bool:
        return False

    def forward(self, index: int, video_tokens: Tensor, identity_tokens: Tensor) -> Tensor:
        raise RuntimeError(f"NoInjector has no injection at block {index}; the backbone must check has() first")


class CrossAttentionInjector(Injector):
    """One Perceiver cross-attention (queries: video tokens, keys/values: identity tokens) at every block
    ``i % interval == 0``, at ``position``, its output multiplied by ``scale`` (ConsisID's
    ``local_face_scale``).

    ``layers[k]`` serves block ``k * interval`` (ConsisID's ``perceiver_cross_attention[k]``). With
    ``zero_init`` the output projections start at zero, so attaching the injector leaves a pretrained
    backbone's output unchanged at step 0. ``scale == 0`` switches the route off (``has`` answers False).
    """

    def __init__(
        self,
        dim: int,
        kv_dim: int,
        num_layers: int,
        interval: int = 2,
        position: str = "after_block",
        heads: int = 16,
        dim_head: int = 128,
        scale: float = 1.0,
        zero_init: bool = True,
        sites: tuple[str, ...] | list[str] | None = None,
    ) -> None:
        super().__init__()
        sites = tuple(sites) if sites is not None else _backbone_sites()
        if position not in sites:
            raise ValueError(f"injector position {position!r} is unknown; pick one of {list(sites)}")
        if interval < 1:
            raise ValueError(f"injector interval must be >= 1, got {interval}")
        if num_layers < 1:
            raise ValueError(f"injector num_layers must be the backbone's block count (>= 1), got {num_layers}")
        self.dim = dim
        self.kv_dim = kv_dim
        self.num_layers = num_layers
        self.interval = interval
        self.position = position
        self.positions = (position,)
        self.scale = float(scale)
        self.layers = nn.ModuleList(
            PerceiverAttention(dim, kv_dim, heads=heads, dim_head=dim_head, context_includes_queries=False)
            for _ in range(0, num_layers, interval)
        )
        if zero_init:
            for layer in self.layers:
                nn.init.zeros_(layer.to_out.weight)

    def has(self, index: int, position: str) -> bool:
        return (
            self.scale != 0.0 and position == self.position and index % self.interval == 0 and index < self.num_layers
        )

    def forward(self, index: int, video_tokens: Tensor, identity_tokens: Tensor) -> Tensor:
        """``video_tokens (B, N, dim)``, ``identity_tokens (B, Q, kv_dim)`` -> scaled residual ``(B, N, dim)``."""
        assert index % self.interval == 0, f"block {index} has no injection (interval {self.interval})"
        layer = self.layers[index // self.interval]
        if isinstance(identity_tokens, IdentityKV):  # keys and values memoised once per video
            kv = identity_tokens.kv(index, video_tokens.shape[0], video_tokens.dtype, layer.context_kv)
            return self.scale * layer(None, video_tokens, kv=kv)
        return self.scale * layer(identity_tokens.to(video_tokens.dtype), video_tokens)

    def extra_repr(self) -> str:
        return f"position={self.position!r}, interval={self.interval}, scale={self.scale}"
