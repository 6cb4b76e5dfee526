"""Global (low-frequency) facial extractors: reference face -> latent concatenated to the noisy latent.

The output ``(B, f, C_g, h, w)`` is concatenated with the noisy video latent on the channel axis, so the
backbone's ``in_channels`` are ``codec.latent_channels + global_encoder.channels(codec)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from consisid_lab.models.vae import LatentCodec

FACE_FRAME = 0  # latent frame that carries the reference face
KPS_FRAME = 1  # latent frame that carries the rendered keypoint image (when use_kps)


class GlobalEncoder(nn.Module):
    """Interface.

    ``channels(codec)`` is C_g (0 when the route is off); ``forward(ref_face (B, 3, H, W) in [-1, 1],
    kps_image (B, 3, H, W) | None, codec, num_latent_frames) -> (B, f, C_g, h, w) | None``.

    ``use_kps`` declares whether ``forward`` reads the rendered keypoint image (the composition renders one only
    then, and refuses a keypoint renderer that renders none).
    """

    use_kps: bool = False
    frozen: bool = False
    carries_identity: bool = True  # False: the route is off (no channels, or channels that hold no face)

    def channels(self, codec: LatentCodec) -> int:
        raise NotImplementedError

    def forward(
        self, ref_face: Tensor, kps_image: Tensor | None, codec: LatentCodec, num_latent_frames: int
    ) -> Tensor | None:
        raise NotImplementedError


class NoGlobalEncoder(GlobalEncoder):
    """No low-frequency route: nothing is concatenated (C_g = 0).

    ``use_kps=false`` is accepted (compositions such as ``+experiment=consisid`` set it on whatever global encoder
    is chosen); ``true`` is refused: there is no latent to carry a keypoint image.
    """

    carries_identity = False
    name = "none"

    def __init__(self, use_kps: bool = False) -> None:
        super().__init__()
        if use_kps:
            raise ValueError(
                f"model/global_encoder={self.name} has no latent to carry a keypoint image, but use_kps=true is set; "
                "set model.global_encoder.use_kps=false (or drop it), or pick model/global_encoder=face_latent"
            )

    def channels(self, codec: LatentCodec) -> int:
        return 0

    def forward(self, ref_face: Tensor, kps_image: Tensor | None, codec: LatentCodec, num_latent_frames: int) -> None:
        return None


class ZeroLatentEncoder(NoGlobalEncoder):
    """No low-frequency route on a backbone that has the image channels: they are all zeros (C_g =
    ``codec.latent_channels``), as an image-to-video backbone sees at every latent frame but the first.

    The ablation of the global route for a fine-tune from a base backbone (``+experiment=from_base``): the base's
    input projection keeps its shape and loads, where ``model/global_encoder=none`` drops the channels and cannot.
    """

    name = "zero_latent"

    def channels(self, codec: LatentCodec) -> int:
        return codec.latent_channels

    def forward(
        self, ref_face: Tensor, kps_image: Tensor | None, codec: LatentCodec, num_latent_frames: int
    ) -> Tensor:
        _, c, h, w = codec.latent_shape(1, *ref_face.shape[-2:])
        return ref_face.new_zeros((ref_face.shape[0], num_latent_frames, c, h, w))


class FaceLatentEncoder(GlobalEncoder):
    """The paper's global facial extractor: the reference face's latent at frame 0, zeros at the other frames.

    With ``use_kps`` the rendered keypoint image's latent goes at latent frame 1 (the released ``is_kps`` layout).
    C_g = ``codec.latent_channels``. No parameters: the codec is frozen and the backbone's input projection learns
    what to do with the extra channels.
    """

    def __init__(self, use_kps: bool = False, face_frames: str = "first") -> None:
        super().__init__()
        if face_frames not in ("first", "all"):
            raise ValueError(
                f"model.global_encoder.face_frames must be 'first' (the released layout) or 'all', got {face_frames!r}"
            )
        if face_frames == "all" and use_kps:
            raise ValueError(
                "model.global_encoder.face_frames=all puts the reference at every latent frame, leaving none for the "
                "keypoint latent (use_kps=true); set model.global_encoder.use_kps=false or face_frames=first"
            )
        self.use_kps = use_kps
        self.face_frames = face_frames

    def channels(self, codec: LatentCodec) -> int:
        return codec.latent_channels

    def forward(
        self, ref_face: Tensor, kps_image: Tensor | None, codec: LatentCodec, num_latent_frames: int
    ) -> Tensor:
        if self.use_kps and kps_image is None:
            raise ValueError(
                "model.global_encoder.use_kps=true needs a keypoint image, but model/keypoint_renderer=none gave "
                "none; pick model/keypoint_renderer=five_point or set model.global_encoder.use_kps=false"
            )
        needed = KPS_FRAME + 1 if self.use_kps else FACE_FRAME + 1
        if num_latent_frames < needed:
            raise ValueError(
                f"model.global_encoder.use_kps={self.use_kps} needs at least {needed} latent frames, got "
                f"{num_latent_frames}; use more video frames or set model.global_encoder.use_kps=false"
            )
        face = codec.encode_image(ref_face)  # (B, 1, C, h, w)
        out = torch.zeros(
            (face.shape[0], num_latent_frames, *face.shape[2:]), device=face.device, dtype=face.dtype
        )  # (B, f, C, h, w)
        if self.face_frames == "all":
            out[:] = face
        else:
            out[:, FACE_FRAME] = face[:, 0]
        if self.use_kps:
            out[:, KPS_FRAME] = codec.encode_image(kps_image)[:, 0]
        return out
