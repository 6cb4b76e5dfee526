"""Fusers: ``IdentityFeatures`` (named vectors and token maps) -> identity tokens ``(B, Q, D_kv)``.

Every fuser is built from the local encoder's declared :class:`~consisid_lab.types.FeatureSpec` (``spec=``; the
composition passes it), or from explicit sizes (``id_dim`` = the summed width of the feature vectors, in the order
the local encoder emits them; ``token_dims`` = the width of each token map, in order), so no module is lazy. A
fuser refuses a spec it cannot work from (``needs_tokens``) with an error naming the encoder and the fix.
``output_dim`` is what the injector uses as its key/value width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from consisid_lab.models.injector import PerceiverAttention
from consisid_lab.types import FeatureSpec, IdentityFeatures


class Fuser(nn.Module):
    """Interface. ``needs_tokens``: the fuser cannot work from vectors alone."""

    needs_tokens: bool = False
    needs_vectors: bool = False
    frozen: bool = False
    output_dim: int
    name: str = "fuser"

    def forward(self, features: IdentityFeatures) -> Tensor:
        raise NotImplementedError

    @classmethod
    def _from_spec(
        cls, spec: FeatureSpec | None, id_dim: int | None, token_dims: list[int] | None
    ) -> tuple[int | None, list[int] | None]:
        """``(id_dim, token_dims)`` from ``spec`` when given (explicit sizes then must agree or be unset)."""
        if spec is None:
            return id_dim, token_dims
        if spec.is_empty():
            raise ValueError(
                f"model/fuser={cls.name}: {spec.source} declares no features; pick a model/local_encoder other "
                "than none, or drop the local route (model/local_encoder=none builds no fuser)"
            )
        if cls.needs_vectors and not spec.vectors:
            raise ValueError(
                f"model/fuser={cls.name} needs feature vectors (its ID tokens come from them), but {spec.source} "
                f"declares only token maps {list(spec.tokens)}; add a vector (model/local_encoder=arcface_clip, "
                "or arcface_layer=both / last) or pick model/fuser=concat"
            )
        if cls.needs_tokens and not spec.has_tokens:
            raise ValueError(
                f"model/fuser={cls.name} needs token maps, but {spec.source} declares only vectors "
                f"{list(spec.vectors)}; pick model/fuser=mlp (or concat), or a local encoder with token maps "
                "(clip, or arcface_layer=penultimate / both)"
            )
        for what, given, declared in (("id_dim", id_dim, spec.id_dim), ("token_dims", token_dims, spec.token_dims)):
            if given is not None and (list(given) if isinstance(given, (list, tuple)) else given) != declared:
                raise ValueError(
                    f"model/fuser={cls.name}: {what}={given} disagrees with {spec.source}, which declares "
                    f"{declared}; remove model.fuser.{what} (the local encoder's spec sets it)"
                )
        return spec.id_dim, spec.token_dims

    def _check_not_empty(self, features: IdentityFeatures) -> None:
        if features.is_empty():
            raise ValueError(
                f"fuser {self.name!r} got empty IdentityFeatures (no vectors, no token maps); the local encoder "
                "produced nothing: pick a model/local_encoder other than none, or model/injector=none"
            )

    def _id_vector(self, features: IdentityFeatures, id_dim: int) -> Tensor:
        """The feature vectors concatenated in order, checked against the declared ``id_dim``."""
        if not features.vectors:
            raise ValueError(
                f"fuser {self.name!r} needs feature vectors (declared id_dim={id_dim}), got only token maps "
                f"{list(features.tokens)}; pick a local encoder that emits vectors"
            )
        vec = torch.cat(list(features.vectors.values()), dim=-1)  # (B, id_dim)
        if vec.shape[-1] != id_dim:
            dims = {k: v.shape[-1] for k, v in features.vectors.items()}
            raise ValueError(
                f"fuser {self.name!r} was built for id_dim={id_dim} but the feature vectors {dims} sum to "
                f"{vec.shape[-1]}; set the fuser's id_dim to {vec.shape[-1]}"
            )
        return vec


def _mlp(in_dim: int, dim: int, out_dim: int) -> nn.Sequential:
    # The mapping network shape of ConsisID's local facial extractor (kept so its weights load 1:1).
    return nn.Sequential(
        nn.Linear(in_dim, dim),
        nn.LayerNorm(dim),
        nn.LeakyReLU(),
        nn.Linear(dim, dim),
        nn.LayerNorm(dim),
        nn.LeakyReLU(),
        nn.Linear(dim, out_dim),
    )


class PerceiverLayer(nn.Module):
    """One resampler layer: Perceiver attention over [context; queries] and a feed-forward, both residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int) -> None:
        super().__init__()
        self.attn = PerceiverAttention(dim, dim, heads=heads, dim_head=dim_head, context_includes_queries=True)
        self.ff = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, dim * ff_mult, bias=False),
            nn.GELU(),
            nn.Linear(dim * ff_mult, dim, bias=False),
        )

    def forward(self, context: Tensor, latents: Tensor) -> Tensor:
        latents = latents + self.attn(context, latents)
        return latents + self.ff(latents)


class PerceiverFuser(Fuser):
    """The paper's local facial extractor (a Q-Former / Perceiver resampler).

    The concatenated feature vectors (ArcFace 512 + CLIP 768 = 1280 in ConsisID) become ``num_id_token`` ID
    tokens of width ``vit_dim`` through an MLP. ``num_queries`` learnable queries, together with the ID tokens,
    attend per scale (one scale per token map, in order) over [ID tokens; that map's tokens after its own
    mapping MLP] for ``depth // num_scale`` layers; the query outputs are projected to ``output_dim``.
    Numerics and parameter structure match ConsisID's ``LocalFacialExtractor`` (see
    ``consisid_lab.models.consisid`` for the key map). A token map whose width is not ``vit_dim`` first goes
    through its own linear input projection (``input_proj[i]``; ConsisID has none, its maps are all 1024-d).
    """

    needs_tokens = True
    needs_vectors = True
    name = "perceiver"

    def __init__(
        self,
        id_dim: int | None = None,
        vit_dim: int = 1024,
        depth: int = 10,
        dim_head: int = 64,
        heads: int = 16,
        num_id_token: int = 5,
        num_queries: int = 32,
        output_dim: int = 2048,
        ff_mult: int = 4,
        num_scale: int | None = None,
        token_dims: list[int] | int | None = None,
        layers_per_scale: int | None = None,
        spec: FeatureSpec | None = None,
    ) -> None:
        super().__init__()
        if spec is not None:
            id_dim, token_dims = self._from_spec(spec, id_dim, None if isinstance(token_dims, int) else token_dims)
        id_dim = 1280 if id_dim is None else int(id_dim)  # ConsisID's ArcFace 512 + CLIP 768
        if token_dims is None:
            if num_scale is None:
                raise ValueError("PerceiverFuser needs num_scale or token_dims (one entry per token map)")
            token_dims = [vit_dim] * num_scale
        elif isinstance(token_dims, int):
            token_dims = [token_dims] * (num_scale if num_scale is not None else 1)
        token_dims = [int(d) for d in token_dims]
        if num_scale is None:
            num_scale = len(token_dims)
        if num_scale < 1 or len(token_dims) != num_scale:
            raise ValueError(
                f"fuser 'perceiver' needs token maps: num_scale={num_scale} but token_dims={token_dims}; "
                "pick model/fuser=mlp or a local encoder with tokens"
            )
        if layers_per_scale is None:
            if depth % num_scale != 0:
                raise ValueError(
                    f"PerceiverFuser depth={depth} is not a multiple of num_scale={num_scale}; set depth to a "
                    f"multiple of {num_scale} or give layers_per_scale"
                )
            layers_per_scale = depth // num_scale
        self.id_dim = id_dim
        self.vit_dim = vit_dim
        self.num_id_token = num_id_token
        self.num_queries = num_queries
        self.num_scale = num_scale
        self.layers_per_scale = layers_per_scale
        self.token_dims = token_dims
        self.output_dim = output_dim
        scale = vit_dim**-0.5
        self.queries = nn.Parameter(torch.randn(1, num_queries, vit_dim) * scale)
        # A raw matrix (not nn.Linear) applied as ``latents @ proj_out``, as in ConsisID, so weights map 1:1.
        self.proj_out = nn.Parameter(torch.randn(vit_dim, output_dim) * scale)
        self.id_mapping = _mlp(id_dim, vit_dim, vit_dim * num_id_token)
        self.input_proj = nn.ModuleDict(
            {str(i): nn.Linear(d, vit_dim) for i, d in enumerate(token_dims) if d != vit_dim}
        )
        self.scale_mappings = nn.ModuleList(_mlp(vit_dim, vit_dim, vit_dim) for _ in range(num_scale))
        self.layers = nn.ModuleList(
            PerceiverLayer(vit_dim, heads, dim_head, ff_mult) for _ in range(num_scale * layers_per_scale)
        )

    def forward(self, features: IdentityFeatures) -> Tensor:
        self._check_not_empty(features)
        maps = list(features.tokens.values())
        if len(maps) != self.num_scale:
            raise ValueError(
                f"fuser 'perceiver' was built for {self.num_scale} token maps but got {len(maps)} "
                f"({list(features.tokens)}); "
                + (
                    "pick model/fuser=mlp or a local encoder with tokens"
                    if not maps
                    else f"set the fuser's token_dims to the {len(maps)} map widths"
                )
            )
        id_vec = self._id_vector(features, self.id_dim)  # (B, id_dim)
        return self.fuse(id_vec, maps)

    def fuse(self, id_vec: Tensor, maps: list[Tensor]) -> Tensor:
        """``id_vec (B, id_dim)``, ``maps``: ``num_scale`` tensors ``(B, N_i, D_i)`` -> ``(B, Q, output_dim)``."""
        b = id_vec.shape[0]
        id_tokens = self.id_mapping(id_vec).reshape(b, self.num_id_token, self.vit_dim)  # (B, n_id, D)
        latents = torch.cat([self.queries.expand(b, -1, -1), id_tokens], dim=1)  # (B, Q + n_id, D)
        for i, tokens in enumerate(maps):
            if tokens.shape[-1] != self.token_dims[i]:
                raise ValueError(
                    f"fuser 'perceiver': token map {i} has width {tokens.shape[-1]}, built for {self.token_dims[i]}; "
                    "set token_dims to the local encoder's map widths"
                )
            if str(i) in self.input_proj:
                tokens = self.input_proj[str(i)](tokens)  # (B, N_i, D)
            context = torch.cat([id_tokens, self.scale_mappings[i](tokens)], dim=1)  # (B, n_id + N_i, D)
            for layer in self.layers[i * self.layers_per_scale : (i + 1) * self.layers_per_scale]:
                latents = layer(context, latents)
        return latents[:, : self.num_queries] @ self.proj_out  # (B, Q, output_dim)


class MLPFuser(Fuser):
    """Vectors -> ``num_tokens`` tokens through an MLP; token maps are ignored unless ``pool_tokens``
    (then each map is mean-pooled over its tokens and appended to the vector)."""

    name = "mlp"

    def __init__(
        self,
        id_dim: int | None = None,
        output_dim: int = 2048,
        num_tokens: int = 4,
        hidden_dim: int | None = None,
        token_dims: list[int] | None = None,
        pool_tokens: bool = False,
        spec: FeatureSpec | None = None,
    ) -> None:
        super().__init__()
        id_dim, token_dims = self._from_spec(spec, id_dim, token_dims)
        if id_dim is None:
            raise ValueError("fuser 'mlp' needs id_dim (the summed vector width) or spec= (the local encoder's)")
        self.id_dim = int(id_dim)
        self.pool_tokens = pool_tokens
        self.token_dims = [int(d) for d in (token_dims or [])]
        in_dim = id_dim + (sum(self.token_dims) if pool_tokens else 0)
        if in_dim <= 0:
            raise ValueError(
                f"fuser 'mlp' has no input (id_dim={id_dim}, pool_tokens={pool_tokens}); pick a local encoder with "
                "feature vectors or set pool_tokens=true with token_dims"
            )
        self.output_dim = output_dim
        self.num_tokens = num_tokens
        hidden = hidden_dim or output_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.LayerNorm(hidden),
            nn.GELU(),
            nn.Linear(hidden, num_tokens * output_dim),
        )
        self.norm = nn.LayerNorm(output_dim)

    def forward(self, features: IdentityFeatures) -> Tensor:
        self._check_not_empty(features)
        parts = [self._id_vector(features, self.id_dim)] if self.id_dim > 0 else []
        if self.pool_tokens:
            pooled = [t.mean(dim=1) for t in features.tokens.values()]  # each (B, D_i)
            if [p.shape[-1] for p in pooled] != self.token_dims:
                raise ValueError(
                    f"fuser 'mlp' pools token maps of widths {self.token_dims}, got "
                    f"{[p.shape[-1] for p in pooled]}; set token_dims to the local encoder's map widths"
                )
            parts += pooled
        x = torch.cat(parts, dim=-1)  # (B, in_dim)
        return self.norm(self.net(x).reshape(x.shape[0], self.num_tokens, self.output_dim))  # (B, Q, D_kv)


class ConcatFuser(Fuser):
    """No learned queries: each vector becomes one token and each token map is projected token-wise; all are
    concatenated, ``Q = len(vector_dims) + sum of map lengths``.

    ``vector_dims`` lists each vector's width in order; without it the concatenated vector (``id_dim``) is one
    token.
    """

    name = "concat"

    def __init__(
        self,
        output_dim: int = 2048,
        id_dim: int = 0,
        token_dims: list[int] | None = None,
        vector_dims: list[int] | None = None,
        spec: FeatureSpec | None = None,
    ) -> None:
        super().__init__()
        if spec is not None:
            _, token_dims = self._from_spec(spec, None, token_dims)
            vector_dims = spec.vector_dims
        self.vector_dims = [int(d) for d in vector_dims] if vector_dims else ([int(id_dim)] if id_dim else [])
        self.split_vectors = bool(vector_dims)
        self.token_dims = [int(d) for d in (token_dims or [])]
        if not self.vector_dims and not self.token_dims:
            raise ValueError("fuser 'concat' has no inputs: give id_dim / vector_dims or token_dims")
        self.output_dim = output_dim
        self.vector_proj = nn.ModuleList(nn.Linear(d, output_dim) for d in self.vector_dims)
        self.token_proj = nn.ModuleList(nn.Linear(d, output_dim) for d in self.token_dims)
        self.norm = nn.LayerNorm(output_dim)

    def forward(self, features: IdentityFeatures) -> Tensor:
        self._check_not_empty(features)
        if self.split_vectors:
            vectors = list(features.vectors.values())
        else:
            vectors = [self._id_vector(features, self.vector_dims[0])] if self.vector_dims else []
        maps = list(features.tokens.values())
        got_v, got_t = [v.shape[-1] for v in vectors], [t.shape[-1] for t in maps]
        if got_v != self.vector_dims or got_t != self.token_dims:
            raise ValueError(
                f"fuser 'concat' was built for vectors {self.vector_dims} and token maps {self.token_dims}, got "
                f"vectors {got_v} and token maps {got_t}; set vector_dims / token_dims to the local encoder's"
            )
        tokens = [proj(v).unsqueeze(1) for proj, v in zip(self.vector_proj, vectors)]  # each (B, 1, D_kv)
        tokens += [proj(t) for proj, t in zip(self.token_proj, maps)]  # each (B, N_i, D_kv)
        return self.norm(torch.cat(tokens, dim=1))  # (B, Q, D_kv)
