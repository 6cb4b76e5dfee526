"""The composed denoiser (backbone + fuser + injector) and its exact correspondence with diffusers'
``ConsisIDTransformer3DModel``.

``from_diffusers(transformer)`` builds our composition from the diffusers model's config and loads its weights
through an explicit key map (``diffusers_to_ours``), strictly; ``to_diffusers_state_dict(model)`` goes back.
In ConsisID the identity cross-attention follows every ``i % cross_attn_interval == 0`` whole block, i.e. our
``after_block`` position, scaled by ``local_face_scale``.

Key correspondence (``{i}``, ``{n}``: indices; ``{p}``: ``weight`` / ``bias``):

==================================================  ==================================================
diffusers ``ConsisIDTransformer3DModel``            ours ``ConsisIDDenoiser``
==================================================  ==================================================
``patch_embed.*``, ``time_embedding.*``,             ``backbone.transformer.<same>``
``transformer_blocks.*``, ``norm_final.*``,
``norm_out.*``, ``proj_out.*``
``perceiver_cross_attention.{i}.norm1.{p}``          ``backbone.injector.layers.{i}.norm_context.{p}``
``perceiver_cross_attention.{i}.norm2.{p}``          ``backbone.injector.layers.{i}.norm_queries.{p}``
``perceiver_cross_attention.{i}.to_{q,kv,out}.*``    ``backbone.injector.layers.{i}.to_{q,kv,out}.*``
``local_facial_extractor.latents``                   ``fuser.queries``
``local_facial_extractor.proj_out``                  ``fuser.proj_out``
``local_facial_extractor.id_embedding_mapping.{n}``  ``fuser.id_mapping.{n}``
``local_facial_extractor.mapping_{i}.{n}``           ``fuser.scale_mappings.{i}.{n}``
``local_facial_extractor.layers.{i}.0.norm1``        ``fuser.layers.{i}.attn.norm_context``
``local_facial_extractor.layers.{i}.0.norm2``        ``fuser.layers.{i}.attn.norm_queries``
``local_facial_extractor.layers.{i}.0.to_*``         ``fuser.layers.{i}.attn.to_*``
``local_facial_extractor.layers.{i}.1.{n}``          ``fuser.layers.{i}.ff.{n}``
==================================================  ==================================================
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from consisid_lab.models.backbone import VideoDiT
from consisid_lab.models.fuser import Fuser, PerceiverFuser
from consisid_lab.models.injector import CrossAttentionInjector, Injector
from consisid_lab.types import IdentityFeatures

# Backbone arguments that ConsisID's config shares with CogVideoXTransformer3DModel.
_BACKBONE_KEYS = (
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "time_embed_dim",
    "text_embed_dim",
    "num_layers",
    "dropout",
    "attention_bias",
    "sample_width",
    "sample_height",
    "sample_frames",
    "patch_size",
    "temporal_compression_ratio",
    "max_text_seq_length",
    "activation_fn",
    "timestep_activation_fn",
    "norm_elementwise_affine",
    "norm_eps",
    "spatial_interpolation_scale",
    "temporal_interpolation_scale",
    "use_rotary_positional_embeddings",
    "use_learned_positional_embeddings",
)

# (diffusers template, ours template). Placeholders: {i}/{n} integers, {p} weight|bias, {rest} any suffix.
KEY_RULES: tuple[tuple[str, str], ...] = (
    ("patch_embed.{rest}", "backbone.transformer.patch_embed.{rest}"),
    ("time_embedding.{rest}", "backbone.transformer.time_embedding.{rest}"),
    ("transformer_blocks.{rest}", "backbone.transformer.transformer_blocks.{rest}"),
    ("norm_final.{rest}", "backbone.transformer.norm_final.{rest}"),
    ("norm_out.{rest}", "backbone.transformer.norm_out.{rest}"),
    ("proj_out.{rest}", "backbone.transformer.proj_out.{rest}"),
    ("perceiver_cross_attention.{i}.norm1.{p}", "backbone.injector.layers.{i}.norm_context.{p}"),
    ("perceiver_cross_attention.{i}.norm2.{p}", "backbone.injector.layers.{i}.norm_queries.{p}"),
    ("perceiver_cross_attention.{i}.to_q.weight", "backbone.injector.layers.{i}.to_q.weight"),
    ("perceiver_cross_attention.{i}.to_kv.weight", "backbone.injector.layers.{i}.to_kv.weight"),
    ("perceiver_cross_attention.{i}.to_out.weight", "backbone.injector.layers.{i}.to_out.weight"),
    ("local_facial_extractor.latents", "fuser.queries"),
    ("local_facial_extractor.proj_out", "fuser.proj_out"),
    ("local_facial_extractor.id_embedding_mapping.{n}.{p}", "fuser.id_mapping.{n}.{p}"),
    ("local_facial_extractor.mapping_{i}.{n}.{p}", "fuser.scale_mappings.{i}.{n}.{p}"),
    ("local_facial_extractor.layers.{i}.0.norm1.{p}", "fuser.layers.{i}.attn.norm_context.{p}"),
    ("local_facial_extractor.layers.{i}.0.norm2.{p}", "fuser.layers.{i}.attn.norm_queries.{p}"),
    ("local_facial_extractor.layers.{i}.0.to_q.weight", "fuser.layers.{i}.attn.to_q.weight"),
    ("local_facial_extractor.layers.{i}.0.to_kv.weight", "fuser.layers.{i}.attn.to_kv.weight"),
    ("local_facial_extractor.layers.{i}.0.to_out.weight", "fuser.layers.{i}.attn.to_out.weight"),
    ("local_facial_extractor.layers.{i}.1.{n}.{p}", "fuser.layers.{i}.ff.{n}.{p}"),
)

_PLACEHOLDERS = {"i": r"\d+", "n": r"\d+", "p": r"weight|bias", "rest": r".+"}


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(s) if k % 2 == 0 else f"(?P<{s}>{_PLACEHOLDERS[s]})" for k, s in enumerate(parts))
    return re.compile(regex)


_FORWARD = tuple((_compile(src), dst) for src, dst in KEY_RULES)
_BACKWARD = tuple((_compile(dst), src) for src, dst in KEY_RULES)


def _map_key(key: str, rules: tuple[tuple[re.Pattern[str], str], ...], direction: str) -> str:
    for pattern, template in rules:
        m = pattern.fullmatch(key)
        if m is not None:
            return template.format(**m.groupdict())
    raise KeyError(f"no {direction} key rule matches {key!r}; extend KEY_RULES in consisid_lab.models.consisid")


def diffusers_to_ours(key: str) -> str:
    """A ``ConsisIDTransformer3DModel`` state-dict key -> the ``ConsisIDDenoiser`` key (KeyError if unmapped)."""
    return _map_key(key, _FORWARD, "diffusers->ours")


def ours_to_diffusers(key: str) -> str:
    """A ``ConsisIDDenoiser`` state-dict key -> the ``ConsisIDTransformer3DModel`` key (KeyError if unmapped)."""
    return _map_key(key, _BACKWARD, "ours->diffusers")


class ConsisIDDenoiser(nn.Module):
    """Backbone + fuser (+ the injector the backbone owns), called like ``ConsisIDTransformer3DModel``.

    ``forward(hidden_states, encoder_hidden_states, timestep, image_rotary_emb, id_cond, id_vit_hidden)``
    takes ConsisID's identity inputs (``id_cond (B, 1280)`` = ArcFace 512 + CLIP 768, ``id_vit_hidden``: the
    ``num_scale`` CLIP hidden states ``(B, 577, 1024)``) and returns the prediction tensor ``(B, F, C_out, h,
    w)``; ``denoise(..., identity=IdentityFeatures)`` is the same with any local encoder's features.
    """

    def __init__(self, backbone: VideoDiT, fuser: Fuser | None = None, is_kps: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.fuser = fuser
        # ConsisID's is_kps: the global route also carries a keypoint-image latent (at latent frame 1).
        self.is_kps = is_kps

    @property
    def injector(self) -> Injector:
        return self.backbone.injector

    def rotary_embedding(
        self, num_frames: int, height: int, width: int, device: torch.device | str | None = None
    ) -> tuple[Tensor, Tensor] | None:
        return self.backbone.rotary_embedding(num_frames, height, width, device)

    def identity_tokens(self, identity: IdentityFeatures | None) -> Tensor | None:
        """``IdentityFeatures`` -> ``(B, Q, D_kv)``, or ``None`` when there is no fuser or no identity."""
        if identity is None or self.fuser is None:
            return None
        return self.fuser(identity)

    def denoise(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        timestep: Tensor,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
        identity: IdentityFeatures | None = None,
    ) -> Tensor:
        """``hidden_states (B, F, C_in, h, w)`` -> ``(B, F, C_out, h, w)``."""
        tokens = self.identity_tokens(identity)  # (B, Q, D_kv) | None
        return self.backbone(hidden_states, encoder_hidden_states, timestep, image_rotary_emb, identity_tokens=tokens)

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        timestep: Tensor,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
        id_cond: Tensor | None = None,
        id_vit_hidden: list[Tensor] | None = None,
    ) -> Tensor:
        identity = None
        if id_cond is not None or id_vit_hidden:
            # ConsisID casts the identity inputs to the latent's device and dtype before fusing.
            like = {"device": hidden_states.device, "dtype": hidden_states.dtype}
            identity = IdentityFeatures(
                vectors={"id_cond": id_cond.to(**like)} if id_cond is not None else {},
                tokens={f"vit_{k}": t.to(**like) for k, t in enumerate(id_vit_hidden or [])},
            )
        return self.denoise(hidden_states, encoder_hidden_states, timestep, image_rotary_emb, identity)


def build_from_config(config: dict[str, Any]) -> ConsisIDDenoiser:
    """Our composition for a ``ConsisIDTransformer3DModel`` config (random weights; see ``from_diffusers``)."""
    cfg = dict(config)
    backbone = VideoDiT(config={k: cfg[k] for k in _BACKBONE_KEYS if k in cfg})
    fuser = None
    if cfg.get("is_train_face", False):
        inner = backbone.inner_dim
        num_layers, interval = cfg["num_layers"], cfg["cross_attn_interval"]
        if num_layers % interval:
            raise ValueError(
                f"ConsisID builds num_layers // cross_attn_interval = {num_layers // interval} cross-attentions but "
                f"injects at {len(range(0, num_layers, interval))} blocks (num_layers={num_layers}, "
                f"cross_attn_interval={interval}); its forward fails there. Use num_layers divisible by the interval"
            )
        fuser = PerceiverFuser(
            id_dim=cfg["LFE_id_dim"],
            vit_dim=cfg["LFE_vit_dim"],
            depth=cfg["LFE_depth"],
            dim_head=cfg["LFE_dim_head"],
            heads=cfg["LFE_num_heads"],
            num_id_token=cfg["LFE_num_id_token"],
            num_queries=cfg["LFE_num_querie"],
            output_dim=cfg["LFE_output_dim"],
            ff_mult=cfg["LFE_ff_mult"],
            num_scale=cfg["LFE_num_scale"],
        )
        injector = CrossAttentionInjector(
            dim=inner,
            kv_dim=int(inner / 3 * 2),  # ConsisID fixes the identity-token width at 2/3 of the DiT width
            num_layers=num_layers,
            interval=interval,
            position="after_block",
            heads=cfg["cross_attn_num_heads"],
            dim_head=cfg["cross_attn_dim_head"],
            scale=cfg["local_face_scale"],
            zero_init=False,
        )
        backbone.set_injector(injector)
    return ConsisIDDenoiser(backbone, fuser, is_kps=bool(cfg.get("is_kps", False)))


def from_diffusers(transformer: nn.Module, key_map: Callable[[str], str] = diffusers_to_ours) -> ConsisIDDenoiser:
    """Our composition with ``transformer``'s weights (a diffusers ``ConsisIDTransformer3DModel``).

    Built on the meta device and loaded with ``strict=True, assign=True``: no key may be missing or left over,
    and the returned model shares tensor storage with ``transformer`` (clone one of them before changing it).
    """
    with torch.device("meta"):
        model = build_from_config(dict(transformer.config))
    state = {}
    for key, value in transformer.state_dict().items():
        new_key = key_map(key)
        if new_key in state:
            raise ValueError(f"key map sends two diffusers keys to {new_key!r} (the second is {key!r})")
        state[new_key] = value
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (sin-cos positional tables when rotary embeddings are off) are not in the state
    # dict: take them from the source model, since the meta build left them empty.
    source_buffers = dict(transformer.named_buffers())
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            owner.register_buffer(attr, source_buffers[ours_to_diffusers(name)], persistent=False)
    return model


def to_diffusers_state_dict(model: ConsisIDDenoiser) -> dict[str, Tensor]:
    """``model``'s weights under ``ConsisIDTransformer3DModel`` keys (loads there with ``strict=True``)."""
    fuser = model.fuser
    if fuser is not None and not isinstance(fuser, PerceiverFuser):
        raise ValueError(
            f"only the perceiver fuser has a ConsisID counterpart, got {type(fuser).__name__}; "
            "use model/fuser=perceiver to export"
        )
    if isinstance(fuser, PerceiverFuser) and len(fuser.input_proj):
        raise ValueError("the perceiver fuser has token input projections that ConsisID lacks; cannot export")
    return {ours_to_diffusers(k): v for k, v in model.state_dict().items()}
