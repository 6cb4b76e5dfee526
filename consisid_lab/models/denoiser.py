"""The one denoiser: conditioning components + video DiT + injector, ``f(x_t, t, cond) -> v``.

The same module trains (inside :class:`~consisid_lab.models.lit_module.IdentityVideoModule`), samples during
validation, generates from a checkpoint, holds the weights of a published ConsisID directory and is the model
checked against diffusers' ``ConsisIDTransformer3DModel``.

Data flow (shapes symbolic)::

    captions --text_encoder--> text (B, L, D_text)
    reference face --keypoint renderer--> kps image --+
    reference face ----------------------------------+--global encoder--> g (B, f, C_g, h, w)   (low frequency)
    reference face --local encoder--> IdentityFeatures --fuser--> id tokens (B, Q, D_kv)       (high frequency)
    v = backbone(cat(x_t, g), text, t, id tokens via the injector)

:meth:`IdentityDenoiser.conditions` builds :class:`Conditions` from a reference face; :meth:`forward` is the
network alone. Components may be absent (``None``) where a caller encodes them itself: a published transformer
loaded without its VAE or text encoder, whose conditions the released pipeline's preprocessing builds.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from consisid_lab.models.backbone import VideoDiT
from consisid_lab.models.fuser import Fuser
from consisid_lab.models.global_encoder import GlobalEncoder, NoGlobalEncoder
from consisid_lab.models.injector import NoInjector
from consisid_lab.models.keypoints import KeypointRenderer, NoKeypointRenderer
from consisid_lab.models.knobs import BranchCache, IdentityKV
from consisid_lab.models.local_encoder import LocalEncoder, NoLocalEncoder
from consisid_lab.types import IdentityFeatures
from consisid_lab.utils.instantiate import instantiate

log = logging.getLogger(__name__)

# Component names, in registration order (which fixes the parameter order the optimizer groups follow).
COMPONENTS = ("vae", "text_encoder", "keypoint_renderer", "global_encoder", "local_encoder", "fuser", "backbone")
# The parts that ConsisID's transformer holds (the rest are its pipeline's other components or preprocessing).
TRANSFORMER_PARTS = ("fuser", "backbone")


@dataclass
class Conditions:
    """Everything the network is conditioned on, already encoded."""

    text: Tensor  # (B, L, D_text)
    global_latent: Tensor | None = None  # (B, f, C_g, h, w), concatenated to x_t on the channel axis
    identity_tokens: Tensor | IdentityKV | None = None  # (B, Q, D_kv), entering through the injector

    def to(self, *args: Any, **kwargs: Any) -> Conditions:
        return Conditions(
            text=self.text.to(*args, **kwargs),
            global_latent=None if self.global_latent is None else self.global_latent.to(*args, **kwargs),
            identity_tokens=None if self.identity_tokens is None else self.identity_tokens.to(*args, **kwargs),
        )


class IdentityDenoiser(nn.Module):
    """Conditioning components, the backbone and its injector (owned by the backbone: ``backbone.injector``).

    Args:
        vae: the frozen latent codec (encodes the reference face for the global route).
        text_encoder: captions -> ``(B, L, D_text)``.
        keypoint_renderer / global_encoder / local_encoder / fuser: the identity routes (``None``: absent).
        backbone: the video DiT with the injector attached.
    """

    def __init__(
        self,
        vae: nn.Module | None,
        text_encoder: nn.Module | None,
        keypoint_renderer: KeypointRenderer | None,
        global_encoder: GlobalEncoder | None,
        local_encoder: LocalEncoder | None,
        fuser: nn.Module | None,
        backbone: VideoDiT,
    ) -> None:
        super().__init__()
        self.vae = vae
        self.text_encoder = text_encoder
        self.keypoint_renderer = keypoint_renderer if keypoint_renderer is not None else NoKeypointRenderer()
        self.global_encoder = global_encoder if global_encoder is not None else NoGlobalEncoder()
        self.local_encoder = local_encoder if local_encoder is not None else NoLocalEncoder()
        self.fuser = fuser
        self.backbone = backbone
        self._rotary_cache: dict[tuple, Any] = {}

    # ------------------------------------------------------------------ construction from the Hydra config
    @classmethod
    def from_config(
        cls,
        vae: Mapping[str, Any],
        text_encoder: Mapping[str, Any],
        keypoint_renderer: Mapping[str, Any] | None,
        global_encoder: Mapping[str, Any] | None,
        local_encoder: Mapping[str, Any] | None,
        fuser: Mapping[str, Any] | None,
        injector: Mapping[str, Any] | None,
        backbone: Mapping[str, Any],
        gradient_checkpointing: bool | int | str = False,
        init_from: str | None = None,
    ) -> IdentityDenoiser:
        """Instantiate the model groups (``conf/model/<group>``); sizes follow each other: the backbone's
        ``in_channels`` follow the codec and the global encoder, the fuser's inputs what the local encoder
        declares, the injector's key/value width the fuser's output.

        ``init_from``: a published ConsisID directory whose transformer weights replace the fuser, backbone and
        injector (built on the meta device, so no random 5 B weights are made first; see
        :mod:`consisid_lab.models.pretrained`).
        """
        codec = instantiate(vae)
        text = instantiate(text_encoder)
        renderer = instantiate(keypoint_renderer)
        g_enc = instantiate(global_encoder)
        l_enc = instantiate(local_encoder)
        check_composition(codec, renderer, g_enc, l_enc)
        has_local = not l_enc.spec.is_empty()
        device = torch.device("meta") if init_from else None
        with torch.device(device) if device is not None else contextlib.nullcontext():
            fuse = build_fuser(fuser, l_enc) if has_local else None
            dit = instantiate(
                backbone,
                in_channels=codec.latent_channels + g_enc.channels(codec),
                out_channels=codec.latent_channels,
                text_dim=text.dim,
                # init_from holds the whole transformer: the backbone's own pretrained weights are not read
                **({"pretrained": None} if init_from and backbone.get("pretrained") else {}),
            )
            kv_dim = fuse.output_dim if fuse is not None else 1
            inj = instantiate(
                injector, dim=dit.inner_dim, kv_dim=kv_dim, num_layers=dit.num_layers, sites=dit.injection_sites
            )
            dit.set_injector(inj)
        if has_local and isinstance(dit.injector, NoInjector):
            log.warning("the local encoder's identity tokens are computed but model/injector=none never uses them")
        if gradient_checkpointing:
            dit.enable_gradient_checkpointing(**checkpoint_policy(gradient_checkpointing))
        model = cls(codec, text, renderer, g_enc, l_enc, fuse, dit)
        if init_from:
            from consisid_lab.models.pretrained import load_published_transformer

            if backbone.get("pretrained"):
                log.warning(
                    "model.backbone.pretrained=%s is ignored: model.init_from=%s holds the whole transformer",
                    backbone.get("pretrained"),
                    init_from,
                )
            load_published_transformer(model, init_from)
        return model

    # ------------------------------------------------------------------ declared facts
    @property
    def has_local_route(self) -> bool:
        return self.fuser is not None

    @property
    def uses_kps(self) -> bool:
        return self.global_encoder.use_kps  # declared by every GlobalEncoder

    def components(self) -> dict[str, nn.Module]:
        """The present components by name, in :data:`COMPONENTS` order."""
        return {n: self._modules[n] for n in COMPONENTS if self._modules.get(n) is not None}

    def frozen_components(self) -> list[str]:
        """Components that declare themselves frozen (``frozen = True``): never trained, whatever the selectors.

        Every component class declares ``frozen`` (the interfaces set it); one that does not is refused here
        rather than silently treated as trainable.
        """
        undeclared = [
            f"{n} ({type(m).__name__})" for n, m in self.components().items() if not hasattr(type(m), "frozen")
        ]
        if undeclared:
            raise TypeError(
                f"components {undeclared} do not declare `frozen`; subclass their group's interface (LatentCodec, "
                "TextEncoder, KeypointRenderer, GlobalEncoder, LocalEncoder, Fuser, VideoDiT) or set `frozen = ...`"
            )
        return [n for n, m in self.components().items() if type(m).frozen]

    # ------------------------------------------------------------------ conditioning
    def encode_text(self, captions: list[str]) -> Tensor:
        return self.text_encoder(captions)  # (B, L, D_text)

    def identity(
        self,
        face: Tensor,
        kps: Tensor,
        num_latent_frames: int,
        features: IdentityFeatures | None = None,
        perturb_image: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Global conditioning latent ``(B, f, C_g, h, w)`` and identity tokens ``(B, Q, D_kv)`` (either may be
        ``None``) for reference faces ``(B, 3, H, W)`` with keypoints ``(B, 5, 2)``.

        ``features``: the local encoder's features when already known (the preprocessing cache).
        ``perturb_image``: applied to the face image, then the keypoint image, that the global encoder encodes
        (the released training's image noise); the local encoder sees the face unperturbed.
        """
        g = self.global_latent(face, kps, num_latent_frames, perturb_image)
        if self.fuser is None:
            return g, None
        features = self.local_encoder(face) if features is None else features
        return g, self.fuser(features)

    def global_latent(
        self,
        face: Tensor,
        kps: Tensor,
        num_latent_frames: int,
        perturb_image: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor | None:
        """The global route's latent ``(B, f, C_g, h, w)`` (or None) of the face and its keypoint image, each
        perturbed by ``perturb_image`` first when given."""
        kps_image = self.keypoint_renderer(face, kps) if self.uses_kps else None
        g_face = face
        if perturb_image is not None and self.global_encoder.channels(self.vae) > 0:
            g_face = perturb_image(face)
            kps_image = None if kps_image is None else perturb_image(kps_image)
        return self.global_encoder(g_face, kps_image, self.vae, num_latent_frames)

    def frozen_identity(
        self, face: Tensor, kps: Tensor, num_latent_frames: int
    ) -> tuple[Tensor | None, IdentityFeatures | None]:
        """What the frozen components make of reference faces ``(B, 3, H, W)`` with keypoints ``(B, 5, 2)``: the
        global latent ``(B, f, C_g, h, w)`` (or None) and the local encoder's features (None without a fuser).
        The trainable fuser turns the features into identity tokens (:meth:`identity_tokens`)."""
        g = self.global_latent(face, kps, num_latent_frames)
        return g, None if self.fuser is None else self.local_encoder(face)

    def identity_tokens(self, features: IdentityFeatures | None) -> Tensor | None:
        """``IdentityFeatures`` -> ``(B, Q, D_kv)``; ``None`` without a fuser or features."""
        if features is None or self.fuser is None:
            return None
        return self.fuser(features)

    def conditions(
        self,
        face: Tensor,
        kps: Tensor,
        text: Tensor | list[str],
        num_latent_frames: int,
        features: IdentityFeatures | None = None,
        perturb_image: Callable[[Tensor], Tensor] | None = None,
    ) -> Conditions:
        """:class:`Conditions` from reference faces and captions (or already encoded text ``(B, L, D_text)``)."""
        g, tokens = self.identity(face, kps, num_latent_frames, features, perturb_image)
        text = self.encode_text(list(text)) if not isinstance(text, Tensor) else text
        return Conditions(text=text, global_latent=g, identity_tokens=tokens)

    # ------------------------------------------------------------------ the network
    def rotary(self, x: Tensor) -> Any:
        """The backbone's rotary embedding for latents ``x (B, f, C, h, w)``, cached per size and device."""
        f, _, h, w = x.shape[1:]
        key = (f, h, w, x.device)
        if key not in self._rotary_cache:
            self._rotary_cache[key] = self.backbone.rotary_embedding(f, h, w, device=x.device)
        return self._rotary_cache[key]

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditions, step_cache: BranchCache | None = None) -> Tensor:
        """``x_t (B, f, C, h, w)``, ``t (B,)`` -> the v prediction ``(B, f, C, h, w)``.

        ``cond.identity_tokens`` may be an :class:`~consisid_lab.models.knobs.IdentityKV` (keys and values
        memoised across a sampler's steps); ``step_cache``: a sampler's first-block cache for this branch."""
        g = cond.global_latent
        inp = x_t if g is None else torch.cat([x_t, g.to(x_t.dtype)], dim=2)  # (B, f, C + C_g, h, w)
        tokens = cond.identity_tokens
        if tokens is not None and not isinstance(tokens, IdentityKV):
            tokens = tokens.to(x_t.dtype)
        return self.backbone(
            inp,
            cond.text.to(x_t.dtype),
            t,
            image_rotary_emb=self.rotary(x_t),
            identity_tokens=tokens,
            step_cache=step_cache,
        )

    def transformer_state_dict(self) -> dict[str, Tensor]:
        """The weights that ConsisID's transformer holds (fuser, backbone, injector), under our names."""
        return {k: v for k, v in self.state_dict().items() if k.split(".", 1)[0] in TRANSFORMER_PARTS}


def check_composition(codec: Any, renderer: Any, global_encoder: Any, local_encoder: Any) -> None:
    """Combinations of components that cannot work, refused before any weight is built."""
    if global_encoder.use_kps and not renderer.renders:
        raise ValueError(
            "model/global_encoder has use_kps=true but model/keypoint_renderer=none renders no keypoint "
            "image; pick model/keypoint_renderer=five_point or set model.global_encoder.use_kps=false"
        )
    if renderer.renders and not global_encoder.use_kps:
        log.info(
            "model/keypoint_renderer=%s renders keypoint images that nothing reads (the global encoder has use_kps "
            "false); model/keypoint_renderer=none skips the rendering",
            type(renderer).__name__,
        )
    no_global = not global_encoder.carries_identity
    no_local = local_encoder.spec.is_empty()
    if no_global and no_local:
        raise ValueError(
            f"model/global_encoder={getattr(global_encoder, 'name', 'none')} and model/local_encoder=none leave no "
            "identity route; keep one"
        )


def build_fuser(cfg: Mapping[str, Any], local_encoder: LocalEncoder) -> nn.Module:
    """The fuser is built from the local encoder's declared :class:`~consisid_lab.types.FeatureSpec` alone; a
    fuser that cannot work from it (the perceiver without token maps) refuses it, naming both and the fix."""
    # Partial first: Hydra would turn the spec (a dataclass) into a config if it were passed through instantiate.
    fuser = instantiate(cfg, _partial_=True)(spec=local_encoder.spec)
    if not isinstance(fuser, Fuser):
        raise TypeError(f"model/fuser built {type(fuser).__name__}, not a consisid_lab.models.fuser.Fuser subclass")
    return fuser


def checkpoint_policy(value: bool | int | str) -> dict[str, Any]:
    """``model.gradient_checkpointing``: ``true`` (every block), an int ``k`` (every k-th block: selective
    checkpointing, less recomputation for more memory) or ``attention`` (the attention of every block alone)."""
    if isinstance(value, bool):
        return {"enabled": value}
    if isinstance(value, int) and value >= 1:
        return {"every": value}
    if value == "attention":
        return {"attention_only": True}
    raise ValueError(
        f"model.gradient_checkpointing={value!r}: use true / false, an int k >= 1 (every k-th block) or 'attention'"
    )


def build_denoiser(model_cfg: Mapping[str, Any]) -> IdentityDenoiser:
    """The denoiser of a whole ``model`` config (the LightningModule's groups; other keys are ignored)."""
    keys = (*COMPONENTS, "injector")
    return IdentityDenoiser.from_config(
        **{k: model_cfg.get(k) for k in keys},
        gradient_checkpointing=model_cfg.get("gradient_checkpointing", False),
        init_from=model_cfg.get("init_from"),
    )
