"""Views of a batch, computed on the device for the whole batch at once.

Weak view: random scaling (0.75-1.25, p=0.5) and rotation (+-30 deg, p=0.5), the same transform for
image and labels. Strong views: CutMix across the batch, a box of sample (i+1) mod B pasted into
sample i at the same place, applied alike to images, partial targets and pseudo-labels.
Intensity remap (optional): a random intensity curve on the views only the student sees.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class WeakAugment:
    scale_range: tuple = (0.75, 1.25)
    scale_prob: float = 0.5
    rotation_deg: float = 30.0
    rotation_prob: float = 0.5

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        """images [B, 1, H, W] in [-1, 1] (air = -1), labels [B, H, W] int -> transformed pair."""
        b = images.shape[0]

        def uniform(low, high):
            return torch.rand(b, generator=generator) * (high - low) + low

        scale = torch.where(torch.rand(b, generator=generator) < self.scale_prob, uniform(*self.scale_range), torch.ones(b))
        angle = torch.where(
            torch.rand(b, generator=generator) < self.rotation_prob,
            uniform(-self.rotation_deg, self.rotation_deg) * math.pi / 180.0,
            torch.zeros(b),
        )
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        zero = torch.zeros(b)
        # affine_grid maps output to input coordinates: dividing by the scale zooms in for scale > 1.
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        theta = theta.to(images.device, images.dtype)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        # Padding with zeros after shifting by +1 fills uncovered corners with air (-1).
        warped = F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
        warped_labels = F.grid_sample(labels[:, None].to(images.dtype), grid, mode="nearest", padding_mode="zeros",
                                      align_corners=False)[:, 0].round().to(labels.dtype)
        return warped, warped_labels


def cutmix_boxes(batch: int, height: int, width: int, generator: torch.Generator, device,
                 area_range=(0.02, 0.4), ratio_range=(0.3, 1 / 0.3)) -> torch.Tensor:
    """One random box per sample, fully inside the image: a [B, H, W] boolean mask."""
    area = (torch.rand(batch, generator=generator) * (area_range[1] - area_range[0]) + area_range[0]) * height * width
    ratio = torch.rand(batch, generator=generator) * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    box_h = torch.sqrt(area * ratio).round().clamp(1, height).long()
    box_w = torch.sqrt(area / ratio).round().clamp(1, width).long()
    top = (torch.rand(batch, generator=generator) * (height - box_h + 1).float()).long()
    left = (torch.rand(batch, generator=generator) * (width - box_w + 1).float()).long()
    rows = torch.arange(height)[None, :, None]
    cols = torch.arange(width)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + box_h)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + box_w)[:, None, None]))
    return inside.to(device)


def cutmix(tensor: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Paste sample (i+1) mod B into sample i inside its box; works for [B, H, W] and [B, C, H, W]."""
    neighbour = torch.roll(tensor, shifts=-1, dims=0)
    mask = boxes if tensor.dim() == 3 else boxes[:, None]
    return torch.where(mask, neighbour, tensor)


@dataclass
class IntensityRemap:
    """A random intensity curve per image, applied with probability `prob`; labels are untouched.

    Contrast phases change organs' intensities by different amounts, and their order too (a kidney is
    brighter than the liver in portal-venous scans and darker in native ones), so no monotone map (such
    as MONAI's RandHistogramShift) turns one phase into another. The curve is piecewise linear over
    [-1, 1] with `segments` equal segments and random knot values in [-1, 1], so it may reorder tissues;
    air (-1) stays air; the result is blended with the image by a random weight in [0, 1], from no change
    to the whole curve. Outside `prob` the image is returned as it is.
    """

    prob: float = 0.0
    segments: int = 8

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """images [B, 1, H, W] in [-1, 1] -> remapped images, same shape and range."""
        if self.prob <= 0:
            return images
        b = images.shape[0]
        chosen = torch.rand(b, generator=generator) < self.prob
        knots = torch.rand(b, self.segments + 1, generator=generator) * 2 - 1
        knots[:, 0] = -1.0  # air stays air
        blend = torch.rand(b, generator=generator) * chosen
        knots, blend = knots.to(images.device, images.dtype), blend.to(images.device, images.dtype)
        position = (images.clamp(-1, 1) + 1) / 2 * self.segments  # [0, segments]
        left = position.floor().clamp(max=self.segments - 1)
        fraction = position - left
        flat = left.long().flatten(1)
        low = knots.gather(1, flat).view_as(images)
        high = knots.gather(1, flat + 1).view_as(images)
        curve = low + fraction * (high - low)
        weight = blend.view(b, *([1] * (images.dim() - 1)))
        return images + weight * (curve - images)
