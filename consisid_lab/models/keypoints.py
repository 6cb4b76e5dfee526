"""Keypoint renderers: (image, 5 facial keypoints) -> an RGB keypoint image the codec can encode.

The keypoint image is a black canvas with coloured limbs and points, in [-1, 1] like every image in the project.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# 5-point ArcFace order (the order of ``VideoBatch.kps``).
LEFT_EYE, RIGHT_EYE, NOSE, LEFT_MOUTH, RIGHT_MOUTH = range(5)
NUM_KEYPOINTS = 5

# Limbs as (point, point): the four spokes from the eyes and mouth corners to the nose, the star that the
# released keypoint drawing uses. Each limb takes the colour of its first point.
FIVE_POINT_LIMBS: tuple[tuple[int, int], ...] = (
    (LEFT_EYE, NOSE),
    (RIGHT_EYE, NOSE),
    (LEFT_MOUTH, NOSE),
    (RIGHT_MOUTH, NOSE),
)

# RGB in [0, 1] per point: red, green, blue, yellow, magenta (the released drawing's palette).
FIVE_POINT_COLORS: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.0, 0.0),
    (0.0, 1.0, 0.0),
    (0.0, 0.0, 1.0),
    (1.0, 1.0, 0.0),
    (1.0, 0.0, 1.0),
)

# Limbs are dimmed so the points stay the brightest marks (the released drawing scales limbs by 0.6).
LIMB_BRIGHTNESS = 0.6


class KeypointRenderer(nn.Module):
    """Interface: ``forward(image (B, 3, H, W), kps (B, 5, 2) pixel xy) -> (B, 3, H, W) in [-1, 1] | None``.

    ``renders`` is False for a renderer that marks the absence of a keypoint route (it returns ``None``).
    """

    renders: bool = True
    frozen: bool = False

    def forward(self, image: Tensor, kps: Tensor) -> Tensor | None:
        raise NotImplementedError


class NoKeypointRenderer(KeypointRenderer):
    """No keypoint image: the global encoder then runs without a keypoint latent."""

    renders = False

    def forward(self, image: Tensor, kps: Tensor) -> None:
        return None


def segment_distance(pixels: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Distance from each pixel centre to segments ``a -> b``.

    pixels: ``(P, 2)`` xy; a, b: ``(..., 2)``. Returns ``(..., P)``. Degenerate segments (a == b) give the distance
    to the point.
    """
    ab = (b - a)[..., None, :]  # (..., 1, 2)
    ap = pixels - a[..., None, :]  # (..., P, 2)
    denom = (ab * ab).sum(-1).clamp_min(1e-12)
    s = ((ap * ab).sum(-1) / denom).clamp(0.0, 1.0)  # (..., P) projection onto the segment
    return (ap - s[..., None] * ab).norm(dim=-1)


def coverage(distance: Tensor, half_width: float) -> Tensor:
    """Anti-aliased coverage of a stroke of ``half_width`` pixels: 1 inside, a one-pixel linear ramp at the edge."""
    return (half_width + 0.5 - distance).clamp(0.0, 1.0)


class FivePointRenderer(KeypointRenderer):
    """Draws the 5 ArcFace-order points and the four limbs to the nose, anti-aliased, on a black canvas.

    Sizes are fractions of the shorter image side, so the drawing scales with the image (floored at one pixel so
    tiny benchmark frames still show every mark). The default radius / thickness match the released drawing on a
    ~1000 px image (radius 10 px, stick half-width 4 px).

    Args:
        radius: point radius / min(H, W).
        thickness: limb width / min(H, W).
    """

    def __init__(self, radius: float = 0.01, thickness: float = 0.008) -> None:
        super().__init__()
        if radius <= 0 or thickness <= 0:
            raise ValueError(f"radius and thickness must be > 0, got radius={radius}, thickness={thickness}")
        self.radius = radius
        self.thickness = thickness
        self.register_buffer("colors", torch.tensor(FIVE_POINT_COLORS), persistent=False)  # (5, 3)
        self.register_buffer("limbs", torch.tensor(FIVE_POINT_LIMBS), persistent=False)  # (S, 2)

    def forward(self, image: Tensor, kps: Tensor) -> Tensor:
        if image.ndim != 4:
            raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
        if kps.shape[1:] != (NUM_KEYPOINTS, 2) or kps.shape[0] != image.shape[0]:
            raise ValueError(f"kps must be (B, 5, 2) with B={image.shape[0]}, got {tuple(kps.shape)}")
        b, _, h, w = image.shape
        side = min(h, w)
        radius_px = max(self.radius * side, 1.0)
        half_width_px = max(self.thickness * side / 2, 0.5)

        kps = kps.to(torch.float32)
        ys, xs = torch.meshgrid(
            torch.arange(h, device=kps.device, dtype=torch.float32),
            torch.arange(w, device=kps.device, dtype=torch.float32),
            indexing="ij",
        )
        pixels = torch.stack([xs, ys], dim=-1).reshape(-1, 2)  # (P, 2), pixel centres at integer coordinates
        colors = self.colors.to(kps.device)
        limbs = self.limbs.to(kps.device)

        a, bb = kps[:, limbs[:, 0]], kps[:, limbs[:, 1]]  # (B, S, 2)
        limb_alpha = coverage(segment_distance(pixels, a, bb), half_width_px)  # (B, S, P)
        point_alpha = coverage((pixels - kps[:, :, None]).norm(dim=-1), radius_px)  # (B, 5, P)
        layers = torch.cat([limb_alpha, point_alpha], dim=1)  # (B, S + 5, P)
        layer_colors = torch.cat([colors[limbs[:, 0]] * LIMB_BRIGHTNESS, colors], dim=0)  # (S + 5, 3)

        # "Over" compositing in drawing order: limbs first, points on top.
        canvas = torch.zeros(b, 3, h * w, device=kps.device)  # (B, 3, P)
        for i in range(layers.shape[1]):
            alpha = layers[:, i : i + 1]  # (B, 1, P)
            canvas = canvas * (1 - alpha) + layer_colors[i][None, :, None] * alpha
        return (canvas.reshape(b, 3, h, w) * 2 - 1).to(image.dtype)
