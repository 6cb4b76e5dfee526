"""The video DiT: diffusers' ``CogVideoXTransformer3DModel`` run by our own forward loop with named injection
points (see ``consisid_lab.models.injector`` for the positions).

Module names stay the diffusers ones under ``transformer`` (``transformer.patch_embed``,
``transformer.transformer_blocks.{i}``, ...), so forward hooks by module-name pattern and the ConsisID key map
see the usual layout. Every block is called as a module (its forward hooks fire, its output is the diffusers
tuple ``(video_tokens, text_tokens)``), including blocks with an injection inside them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock, CogVideoXTransformer3DModel
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from consisid_lab.models.injector import Injector, NoInjector
from consisid_lab.models.knobs import BranchCache, IdentityKV

log = logging.getLogger(__name__)

# Shared by both presets (CogVideoX 1.0 / ConsisID values).
_COMMON: dict[str, Any] = {
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "dropout": 0.0,
    "attention_bias": True,
    "patch_size": 2,
    "temporal_compression_ratio": 4,
    "activation_fn": "gelu-approximate",
    "timestep_activation_fn": "silu",
    "norm_elementwise_affine": True,
    "norm_eps": 1e-5,
    "spatial_interpolation_scale": 1.875,
    "temporal_interpolation_scale": 1.0,
    "use_rotary_positional_embeddings": True,
}

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for CPU tests and the embedded benchmark; head dim 16 keeps the 3D rotary split (4/6/6) whole.
    "tiny": {
        **_COMMON,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "in_channels": 32,
        "out_channels": 16,
        "time_embed_dim": 32,
        "text_embed_dim": 32,
        "num_layers": 2,
        "sample_width": 8,
        "sample_height": 8,
        "sample_frames": 9,
        "max_text_seq_length": 16,
        "use_learned_positional_embeddings": False,
    },
    # CogVideoX-5B-I2V as ConsisID ships it: 48 x 64 heads (inner 3072), 42 layers, 32 -> 16 channels,
    # T5 4096-d text of 226 tokens, rotary plus learned positional embeddings (fixed 60 x 90 latent size).
    "cogvideox_5b_i2v": {
        **_COMMON,
        "num_attention_heads": 48,
        "attention_head_dim": 64,
        "in_channels": 32,
        "out_channels": 16,
        "time_embed_dim": 512,
        "text_embed_dim": 4096,
        "num_layers": 42,
        "sample_width": 90,
        "sample_height": 60,
        "sample_frames": 49,
        "max_text_seq_length": 226,
        "use_learned_positional_embeddings": True,
    },
}

InjectFn = Callable[[Tensor], Tensor]
INITS = ("default", "adaln_zero")


def pool_text(text: Tensor) -> Tensor:
    """Mean of the caption tokens ``(B, L, D) -> (B, D)`` over the non-padding ones (padding tokens are zeros);
    an empty caption pools to zeros."""
    valid = (text.abs().amax(dim=-1) > 0).to(text.dtype).unsqueeze(-1)  # (B, L, 1)
    return (text * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1.0)


# The injection sites, declared once: the injector is checked against them, the block call (plain or
# checkpointed) passes the in-block ones to InjectableBlock by these keyword names, the tests iterate them.
AFTER_BLOCK = "after_block"  # on the residual stream after the whole block
IN_BLOCK_SITES = ("between_attn_ffn", "attn_input")  # InjectableBlock.forward keywords
INJECTION_SITES = (AFTER_BLOCK, *IN_BLOCK_SITES)


class InjectableBlock(CogVideoXBlock):
    """A CogVideoX block whose forward writes the block's math out with two optional in-block injections.

    Same submodules (``norm1``, ``attn1``, ``norm2``, ``ff``), parameters and state-dict keys as
    ``CogVideoXBlock``, and the same output without injections (diffusers' own forward loop still works with
    it). It is a subclass so that block-class based wrapping (FSDP ``auto_wrap_policy``, ``_no_split_modules``)
    still finds the blocks.
    """

    checkpoint_attention: bool = False  # set by VideoDiT.enable_gradient_checkpointing(attention_only=True)

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        temb: Tensor,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        attn_input: InjectFn | None = None,
        between_attn_ffn: InjectFn | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``hidden_states (B, N, D)`` video tokens, ``encoder_hidden_states (B, L, D)`` text tokens.

        ``attn_input`` / ``between_attn_ffn`` map the video tokens at that place to a residual: ``attn_input``'s
        is added to the tokens entering ``norm1`` and the attention (not to the residual stream),
        ``between_attn_ffn``'s to the residual stream after the attention, before ``norm2`` and the FF.
        """
        n_text = encoder_hidden_states.shape[1]
        # attn_input feeds the attention branch only; the residual stream keeps the block's input (adding it
        # there too would make this the previous block's after_block injection under another name).
        attn_in = hidden_states if attn_input is None else hidden_states + attn_input(hidden_states)

        # Adaptive LayerNorm (scale/shift from the time embedding) on both streams; gates for the residuals.
        norm_v, norm_t, gate_v, gate_t = self.norm1(attn_in, encoder_hidden_states, temb)
        attend = partial(self.attn1, image_rotary_emb=image_rotary_emb, **(attention_kwargs or {}))
        if self.checkpoint_attention and torch.is_grad_enabled():
            # Selective checkpointing: only the attention's activations are recomputed in the backward pass.
            attn_v, attn_t = checkpoint(attend, norm_v, norm_t, use_reentrant=False)
        else:
            attn_v, attn_t = attend(norm_v, norm_t)
        hidden_states = hidden_states + gate_v * attn_v
        encoder_hidden_states = encoder_hidden_states + gate_t * attn_t

        if between_attn_ffn is not None:
            hidden_states = hidden_states + between_attn_ffn(hidden_states)

        norm_v, norm_t, gate_v, gate_t = self.norm2(hidden_states, encoder_hidden_states, temb)
        ff_out = self.ff(torch.cat([norm_t, norm_v], dim=1))  # (B, L + N, D): one FF over text and video
        hidden_states = hidden_states + gate_v * ff_out[:, n_text:]
        encoder_hidden_states = encoder_hidden_states + gate_t * ff_out[:, :n_text]
        return hidden_states, encoder_hidden_states


def _block_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "dim": config["num_attention_heads"] * config["attention_head_dim"],
        "num_attention_heads": config["num_attention_heads"],
        "attention_head_dim": config["attention_head_dim"],
        "time_embed_dim": config["time_embed_dim"],
        "dropout": config["dropout"],
        "activation_fn": config["activation_fn"],
        "attention_bias": config["attention_bias"],
        "norm_elementwise_affine": config["norm_elementwise_affine"],
        "norm_eps": config["norm_eps"],
    }


class VideoDiT(nn.Module):
    """Video DiT backbone: ``f(x_t (B, F, C_in, h, w), text (B, L, D_text), t (B,)) -> (B, F, C_out, h, w)``.

    Args:
        preset: a key of ``PRESETS`` (``tiny``, ``cogvideox_5b_i2v``).
        in_channels: latent channels plus conditioning channels (the composition sets it from the global
            encoder); ``None`` keeps the preset's.
        out_channels: predicted latent channels; ``None`` keeps the preset's.
        text_dim: width of the text tokens; ``None`` keeps the preset's ``text_embed_dim``.
        injector: where identity tokens enter (``None``: no injection).
        gradient_checkpointing: recompute each block in the backward pass.
        init: ``default`` (diffusers' initialisation) or ``adaln_zero``: the adaptive norms' modulation layers
            and the output projection start at zero, so every block starts as the identity and the model's first
            prediction is 0 (DiT's adaLN-Zero, Peebles & Xie 2023). For backbones trained from scratch; loaded
            weights replace it.
        pooled_text: add a zero-initialised projection of the mean caption token to the time embedding (as
            SD3 / Flux feed pooled text to their adaptive norms). Not part of CogVideoX / ConsisID: off for the
            published presets; the embedded benchmark's from-scratch DiT needs it to follow captions in minutes.
        config: further ``CogVideoXTransformer3DModel`` arguments overriding the preset.
        pretrained: a CogVideoX diffusers transformer (a checkpoint root with ``transformer/``, or that folder)
            whose weights the DiT starts from, strictly (see :mod:`consisid_lab.models.pretrained`); the DiT is
            built on the meta device first, so no random weights are made.
    """

    frozen: bool = False  # declared: a frozen backbone is asked for with trainable selectors, not here
    injection_sites: tuple[str, ...] = INJECTION_SITES

    def __init__(
        self,
        preset: str = "tiny",
        in_channels: int | None = None,
        out_channels: int | None = None,
        text_dim: int | None = None,
        injector: Injector | None = None,
        gradient_checkpointing: bool = False,
        config: dict[str, Any] | None = None,
        init: str = "default",
        pooled_text: bool = False,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"backbone init={init!r} is unknown; pick one of {INITS}")
        if preset not in PRESETS:
            raise ValueError(f"backbone preset {preset!r} is unknown; pick one of {sorted(PRESETS)}")
        cfg = {**PRESETS[preset], **dict(config or {})}
        for key, value in (("in_channels", in_channels), ("out_channels", out_channels), ("text_embed_dim", text_dim)):
            if value is not None:
                cfg[key] = int(value)
        if cfg.get("patch_size_t") is not None:
            raise ValueError("patch_size_t (CogVideoX 1.5 temporal patches) is not supported; set it to null")
        with torch.device("meta") if pretrained else contextlib.nullcontext():
            self.transformer = CogVideoXTransformer3DModel(**cfg)
        self._use_injectable_blocks()
        if init == "adaln_zero":
            self._zero_modulation()
        # Optional pooled-caption route into the time embedding, zero-initialised (not in CogVideoX): the caption
        # then modulates every block's adaptive norms directly, besides the joint attention.
        self.pooled_text_proj: nn.Linear | None = None
        if pooled_text:
            c = self.transformer.config
            self.pooled_text_proj = nn.Linear(c.text_embed_dim, c.time_embed_dim)
            nn.init.zeros_(self.pooled_text_proj.weight)
            nn.init.zeros_(self.pooled_text_proj.bias)
        if pretrained:
            from consisid_lab.models.pretrained import load_cogvideox_backbone

            load_cogvideox_backbone(self.transformer, pretrained)
        self.injector: Injector = NoInjector()
        self.set_injector(injector)
        self.gradient_checkpointing = gradient_checkpointing
        self.checkpoint_every = 1

    def _use_injectable_blocks(self) -> None:
        # Rebuild the blocks as InjectableBlock with the very same parameters: built on the meta device and
        # assigned the existing tensors, so nothing is allocated twice (matters at 5B).
        old = self.transformer.transformer_blocks
        kwargs = _block_kwargs(dict(self.transformer.config))
        with torch.device("meta"):
            new = [InjectableBlock(**kwargs) for _ in range(len(old))]
        for b_new, b_old in zip(new, old):
            b_new.load_state_dict(b_old.state_dict(), strict=True, assign=True)
        self.transformer.transformer_blocks = nn.ModuleList(new)

    def _zero_modulation(self) -> None:
        t = self.transformer
        layers = [m for blk in t.transformer_blocks for m in (blk.norm1.linear, blk.norm2.linear)]
        for layer in (*layers, t.norm_out.linear, t.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ------------------------------------------------------------------ configuration
    @property
    def config(self) -> dict[str, Any]:
        return dict(self.transformer.config)

    @property
    def inner_dim(self) -> int:
        c = self.transformer.config
        return c.num_attention_heads * c.attention_head_dim

    @property
    def num_layers(self) -> int:
        return len(self.transformer.transformer_blocks)

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    @property
    def in_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def out_channels(self) -> int:
        return self.transformer.config.out_channels

    @property
    def blocks(self) -> nn.ModuleList:
        """The DiT blocks; their module names are ``transformer.transformer_blocks.{i}``."""
        return self.transformer.transformer_blocks

    def block_names(self, prefix: str = "") -> list[str]:
        """Qualified names of the blocks (for forward hooks by name), e.g. ``backbone.`` as prefix."""
        return [f"{prefix}transformer.transformer_blocks.{i}" for i in range(self.num_layers)]

    def set_injector(self, injector: Injector | None) -> None:
        """Attach (as an owned submodule) or detach (``None``) the identity injector, checked against the
        declared :attr:`injection_sites` and the block count."""
        injector = injector if injector is not None else NoInjector()
        unknown = [p for p in injector.positions if p not in self.injection_sites]
        if unknown:
            raise ValueError(
                f"model/injector uses position(s) {unknown}, which the backbone does not have; set "
                f"model.injector.position to one of {list(self.injection_sites)}"
            )
        layers = injector.num_layers
        if layers is not None and layers != self.num_layers:
            raise ValueError(
                f"model/injector was built for {layers} blocks but the backbone has {self.num_layers}; build it "
                "with num_layers=backbone.num_layers (the composition does)"
            )
        self.injector = injector

    def enable_gradient_checkpointing(
        self, enabled: bool = True, every: int = 1, attention_only: bool = False
    ) -> None:
        """Recompute activations in the backward pass: whole blocks (every ``every``-th block: 1 = all, 2 = blocks
        0, 2, 4, ...), or with ``attention_only`` the attention of every block alone (its activations are the
        largest; the feed-forward's are kept)."""
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"gradient checkpointing every={every!r}: give a block interval >= 1 (1 = every block)")
        self.gradient_checkpointing = bool(enabled) and not attention_only
        self.checkpoint_every = every
        for block in self.blocks:
            block.checkpoint_attention = bool(enabled) and attention_only

    def checkpointed_blocks(self) -> list[int]:
        """Indices of the blocks recomputed whole in the backward pass."""
        if not self.gradient_checkpointing:
            return []
        return [i for i in range(self.num_layers) if i % self.checkpoint_every == 0]

    # ------------------------------------------------------------------ positions
    def rotary_embedding(
        self, num_frames: int, height: int, width: int, device: torch.device | str | None = None
    ) -> tuple[Tensor, Tensor] | None:
        """3D rotary embedding ``(cos, sin)``, each ``(F * h/p * w/p, head_dim)``, for latents of
        ``num_frames x height x width``, built as the ConsisID / CogVideoX pipelines build it (the token grid
        fitted into the ``sample_height x sample_width`` base grid, centre crop). ``None`` when the model uses
        no rotary embeddings.
        """
        c = self.transformer.config
        if not c.use_rotary_positional_embeddings:
            return None
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.consisid.pipeline_consisid import get_resize_crop_region_for_grid

        p = c.patch_size
        grid_h, grid_w = height // p, width // p
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), c.sample_width // p, c.sample_height // p)
        cos, sin = get_3d_rotary_pos_embed(
            embed_dim=c.attention_head_dim,
            crops_coords=crops,
            grid_size=(grid_h, grid_w),
            temporal_size=num_frames,
            device=device,
        )
        return cos, sin

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        timestep: Tensor,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
        identity_tokens: Tensor | IdentityKV | None = None,
        step_cache: BranchCache | None = None,
    ) -> Tensor:
        """``hidden_states (B, F, C_in, h, w)``, ``encoder_hidden_states (B, L, D_text)``, ``timestep (B,)``,
        ``identity_tokens (B, Q, D_kv)`` (or their memoised keys and values, :class:`IdentityKV`) or ``None``
        (no injection) -> ``(B, F, C_out, h, w)``.

        ``step_cache``: a sampler's first-block cache for this branch (:class:`~consisid_lab.models.knobs.StepCache`):
        after block 0 it decides whether blocks 1.. run or their last residual is reused."""
        t = self.transformer
        b, f, c, h, w = hidden_states.shape
        p = t.config.patch_size
        if c != t.config.in_channels:
            raise ValueError(
                f"backbone expects {t.config.in_channels} input channels (latent + conditioning), got {c}; "
                "set the backbone's in_channels to match the codec and global encoder"
            )
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {p}")

        t_emb = t.time_proj(timestep).to(hidden_states.dtype)  # (B, D): sinusoidal features come out float32
        emb = t.time_embedding(t_emb)  # (B, D_t)
        if self.pooled_text_proj is not None:
            emb = emb + self.pooled_text_proj(pool_text(encoder_hidden_states)).to(emb.dtype)

        tokens = t.embedding_dropout(t.patch_embed(encoder_hidden_states, hidden_states))  # (B, L + N, D)
        n_text = encoder_hidden_states.shape[1]
        text, video = tokens[:, :n_text], tokens[:, n_text:]  # (B, L, D), (B, N = F*h/p*w/p, D)

        inj = self.injector if identity_tokens is not None else None
        for i, block in enumerate(t.transformer_blocks):
            # The in-block sites as InjectableBlock keywords (None: no injection there), the same for the plain
            # and the checkpointed call.
            sites = {
                s: partial(inj, i, identity_tokens=identity_tokens) if inj is not None and inj.has(i, s) else None
                for s in IN_BLOCK_SITES
            }
            recompute = self.gradient_checkpointing and i % self.checkpoint_every == 0
            if recompute and torch.is_grad_enabled():
                video, text = checkpoint(block, video, text, emb, image_rotary_emb, use_reentrant=False, **sites)
            else:
                video, text = block(video, text, emb, image_rotary_emb, **sites)
            if inj is not None and inj.has(i, AFTER_BLOCK):
                video = video + inj(i, video, identity_tokens)
            if step_cache is not None and i == 0:
                first = video
                if step_cache.skip(first):
                    video = first + step_cache.residual
                    break
        else:
            if step_cache is not None:
                step_cache.store(first, video)

        # LayerNorm is per token, so normalising the video tokens alone equals normalising [text; video].
        video = t.norm_final(video)
        video = t.norm_out(video, temb=emb)
        video = t.proj_out(video)  # (B, N, p*p*C_out)

        out = video.reshape(b, f, h // p, w // p, -1, p, p)  # (B, F, h/p, w/p, C_out, p, p)
        return out.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)  # (B, F, C_out, h, w)
