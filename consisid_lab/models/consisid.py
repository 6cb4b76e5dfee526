"""The exact correspondence between our :class:`~consisid_lab.models.denoiser.IdentityDenoiser` and diffusers'
``ConsisIDTransformer3DModel``.

``build_from_config(config)`` builds the denoiser for a ConsisID config; ``from_diffusers(transformer)`` loads a
diffusers model's weights into it through an explicit key map (``diffusers_to_ours``), strictly;
``consisid_config(denoiser)`` expresses one of our compositions as a ConsisID config (or names the component that
ConsisID cannot express) and ``to_diffusers_state_dict(denoiser)`` gives its weights under ConsisID's keys.
In ConsisID the identity cross-attention follows every ``i % cross_attn_interval == 0`` whole block, i.e. our
``after_block`` position, scaled by ``local_face_scale``. Components outside the transformer (codec, text
encoder, face encoders) are not part of this map.

Key correspondence (``{i}``, ``{n}``: indices; ``{p}``: ``weight`` / ``bias``):

==================================================  ==================================================
diffusers ``ConsisIDTransformer3DModel``            ours ``IdentityDenoiser``
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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from consisid_lab.models.backbone import VideoDiT
from consisid_lab.models.fuser import PerceiverFuser
from consisid_lab.models.injector import CrossAttentionInjector, NoInjector
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
    """A ``ConsisIDTransformer3DModel`` state-dict key -> the ``IdentityDenoiser`` key (KeyError if unmapped)."""
    return _map_key(key, _FORWARD, "diffusers->ours")


def ours_to_diffusers(key: str) -> str:
    """An ``IdentityDenoiser`` state-dict key -> the ``ConsisIDTransformer3DModel`` key (KeyError if unmapped)."""
    return _map_key(key, _BACKWARD, "ours->diffusers")


def build_from_config(config: Mapping[str, Any], vae: nn.Module | None = None, text_encoder: nn.Module | None = None):
    """The denoiser for a ``ConsisIDTransformer3DModel`` config (random weights; see ``from_diffusers``).

    The identity features are the released pipeline's (``id_cond``, CLIP hidden states ``vit_{k}``), computed
    outside the model; the global route is the face latent (plus the keypoint latent for ``is_kps``). ``vae`` /
    ``text_encoder``: the directory's other components, when they are loaded too.
    """
    from consisid_lab.models.denoiser import IdentityDenoiser
    from consisid_lab.models.global_encoder import FaceLatentEncoder
    from consisid_lab.models.local_encoder import PrecomputedFeatures

    cfg = dict(config)
    backbone = VideoDiT(config={k: cfg[k] for k in _BACKBONE_KEYS if k in cfg})
    fuser = None
    local = None
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
        local = PrecomputedFeatures(
            vector_dims={"id_cond": cfg["LFE_id_dim"]},
            token_dims={f"vit_{k}": cfg["LFE_vit_dim"] for k in range(cfg["LFE_num_scale"])},
        )
    return IdentityDenoiser(
        vae=vae,
        text_encoder=text_encoder,
        keypoint_renderer=None,
        global_encoder=FaceLatentEncoder(use_kps=bool(cfg.get("is_kps", False))),
        local_encoder=local,
        fuser=fuser,
        backbone=backbone,
    )


def consisid_features(id_cond: Tensor | None, id_vit_hidden: Sequence[Tensor] | None) -> IdentityFeatures | None:
    """ConsisID's identity inputs (``id_cond (B, LFE_id_dim)``, ``LFE_num_scale`` maps ``(B, N, LFE_vit_dim)``) as
    the features :func:`build_from_config`'s fuser was built for."""
    if id_cond is None and not id_vit_hidden:
        return None
    return IdentityFeatures(
        vectors={"id_cond": id_cond} if id_cond is not None else {},
        tokens={f"vit_{k}": t for k, t in enumerate(id_vit_hidden or [])},
    )


def consisid_forward(
    model,
    hidden_states: Tensor,
    encoder_hidden_states: Tensor,
    timestep: Tensor,
    id_cond: Tensor | None = None,
    id_vit_hidden: Sequence[Tensor] | None = None,
) -> Tensor:
    """``ConsisIDTransformer3DModel``'s call convention on our denoiser: ``hidden_states (B, f, C + C_g, h, w)``
    holds the noisy latent and the image latents side by side on the channel axis; returns ``(B, f, C, h, w)``.

    The rotary embedding is the denoiser's own (the one the ConsisID pipeline builds for this latent size).
    """
    from consisid_lab.models.denoiser import Conditions

    c = model.backbone.out_channels
    # ConsisID casts the identity inputs to the latent's device and dtype before fusing.
    like = {"device": hidden_states.device, "dtype": hidden_states.dtype}
    features = consisid_features(
        id_cond.to(**like) if id_cond is not None else None, [t.to(**like) for t in id_vit_hidden or []]
    )
    g = hidden_states[:, :, c:]
    cond = Conditions(
        text=encoder_hidden_states,
        global_latent=g if g.shape[2] else None,
        identity_tokens=model.identity_tokens(features),
    )
    return model(hidden_states[:, :, :c], timestep, cond)


def from_diffusers(transformer: nn.Module, key_map: Callable[[str], str] = diffusers_to_ours):
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


class NotExpressibleError(ValueError):
    """A composition that diffusers' ConsisID cannot express (the message names the component)."""


def consisid_config(model) -> dict[str, Any]:
    """``model``'s transformer (backbone, injector, fuser) as a ``ConsisIDTransformer3DModel`` config.

    Raises :class:`NotExpressibleError` naming the component ConsisID has no counterpart for.
    """
    backbone, fuser, injector = model.backbone, model.fuser, model.backbone.injector
    cfg = {k: v for k, v in backbone.config.items() if k in _BACKBONE_KEYS}
    inner = backbone.inner_dim
    if backbone.pooled_text_proj is not None:
        raise NotExpressibleError(
            "model.backbone.pooled_text=true adds a pooled-caption route to the time embedding that ConsisID does "
            "not have; train with model.backbone.pooled_text=false to export"
        )
    if backbone.in_channels != 2 * backbone.out_channels:
        raise NotExpressibleError(
            f"model/global_encoder: ConsisID concatenates one face latent to the noise latent (in_channels = 2 x "
            f"{backbone.out_channels}), this backbone takes {backbone.in_channels}; use model/global_encoder="
            "face_latent"
        )
    is_kps = model.global_encoder.use_kps
    cfg.update(is_kps=is_kps, is_train_face=fuser is not None)
    if fuser is None:
        if not isinstance(injector, NoInjector):
            raise NotExpressibleError(
                f"model/injector: {type(injector).__name__} without a fuser has no ConsisID form"
            )
        return cfg
    if not isinstance(fuser, PerceiverFuser):
        raise NotExpressibleError(
            f"model/fuser={getattr(fuser, 'name', type(fuser).__name__)}: ConsisID's local facial extractor is the "
            "perceiver fuser; use model/fuser=perceiver to export"
        )
    if len(fuser.input_proj):
        raise NotExpressibleError(
            f"model/fuser=perceiver has input projections for token maps {fuser.token_dims} wider or narrower than "
            f"vit_dim={fuser.vit_dim}, which ConsisID lacks; set model.fuser.vit_dim to the local encoder's map width"
        )
    if not isinstance(injector, CrossAttentionInjector):
        raise NotExpressibleError(
            f"model/injector: {type(injector).__name__} has no ConsisID counterpart; use "
            "model/injector=cross_attention"
        )
    if injector.position != "after_block":
        raise NotExpressibleError(
            f"model/injector: position={injector.position!r}; ConsisID injects after the whole block only "
            "(model.injector.position=after_block)"
        )
    if backbone.num_layers % injector.interval:
        raise NotExpressibleError(
            f"model/injector: interval {injector.interval} does not divide the {backbone.num_layers} blocks; ConsisID "
            "builds num_layers // interval cross-attentions"
        )
    if fuser.output_dim != int(inner / 3 * 2):
        raise NotExpressibleError(
            f"model/fuser: output_dim={fuser.output_dim}, but ConsisID fixes the identity-token width at 2/3 of the "
            f"DiT width {inner} = {int(inner / 3 * 2)}; set model.fuser.output_dim={int(inner / 3 * 2)}"
        )
    attn = fuser.layers[0].attn
    cross = injector.layers[0]
    cfg.update(
        cross_attn_interval=injector.interval,
        cross_attn_dim_head=cross.dim_head,
        cross_attn_num_heads=cross.heads,
        LFE_id_dim=fuser.id_dim,
        LFE_vit_dim=fuser.vit_dim,
        LFE_depth=fuser.num_scale * fuser.layers_per_scale,
        LFE_dim_head=attn.dim_head,
        LFE_num_heads=attn.heads,
        LFE_num_id_token=fuser.num_id_token,
        LFE_num_querie=fuser.num_queries,
        LFE_output_dim=fuser.output_dim,
        LFE_ff_mult=fuser.layers[0].ff[1].out_features // fuser.vit_dim,
        LFE_num_scale=fuser.num_scale,
        local_face_scale=injector.scale,
    )
    return cfg


def to_diffusers_state_dict(model) -> dict[str, Tensor]:
    """``model``'s transformer weights under ``ConsisIDTransformer3DModel`` keys (loads there with ``strict=True``);
    :class:`NotExpressibleError` for a composition ConsisID cannot express."""
    consisid_config(model)
    return {ours_to_diffusers(k): v for k, v in model.transformer_state_dict().items()}
