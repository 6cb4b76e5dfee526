"""Face crops of video frames, the images whose spectra the paper's Fig. 7 compares."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R BT.601 luma weights: the grayscale the paper's CLIP branch and most face pipelines use.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
MASK_THRESHOLD = 0.5


def crop_faces(images: Tensor, masks: Tensor, size: int = 32, channels: str = "gray") -> Tensor:
    """Crop every image to the bounding box of its mask and resize to ``size x size``.

    images: ``(N, 3, H, W)``; masks: ``(N, 1, H, W)`` (any value > 0.5 counts as face). The tight box is grown to
    a square around its centre (clamped to the image) before resizing so that the crop is not stretched
    anisotropically, which would move energy between the horizontal and vertical frequencies. Images with an
    empty mask are skipped. Returns ``(M, C, size, size)`` with ``M <= N`` and ``C`` = 1 (``gray``) or 3
    (``rgb``).
    """
    if channels not in ("gray", "rgb"):
        raise ValueError(f"face crop channels must be 'gray' or 'rgb', got {channels!r}")
    if images.ndim != 4 or masks.ndim != 4 or images.shape[0] != masks.shape[0]:
        raise ValueError(
            f"expected images (N, 3, H, W) and masks (N, 1, H, W), got {tuple(images.shape)} and {tuple(masks.shape)}"
        )
    if images.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"image size {tuple(images.shape[-2:])} differs from mask size {tuple(masks.shape[-2:])}")
    _, _, h, w = images.shape
    images = images.float()
    if channels == "gray":
        weights = torch.tensor(LUMA_WEIGHTS, device=images.device, dtype=images.dtype)
        images = (images * weights[None, :, None, None]).sum(dim=1, keepdim=True)  # (N, 1, H, W)
    crops = []
    for img, mask in zip(images, masks[:, 0] > MASK_THRESHOLD):
        rows = torch.nonzero(mask.any(dim=1)).flatten()
        cols = torch.nonzero(mask.any(dim=0)).flatten()
        if rows.numel() == 0:
            continue
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        side = min(max(y1 - y0, x1 - x0), h, w)
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        top = min(max(cy - side // 2, 0), h - side)
        left = min(max(cx - side // 2, 0), w - side)
        crop = img[None, :, top : top + side, left : left + side]  # (1, C, side, side)
        crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True))
    if not crops:
        return images.new_zeros(0, images.shape[1], size, size)
    return torch.cat(crops)  # (M, C, size, size)
