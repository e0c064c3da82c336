"""Random views of uint8 images: flips and crops, drawn for a whole batch at once from a seeded generator.

Shared by the dense baseline (:mod:`vitdsi_utils.baselines.dense`), which trains on such views, and the
DSI's retrieval fine-tuning (:mod:`vitdsi_utils.training.loop`), where augmented views of the indexed
images serve as extra queries that must return their own image's ID.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment(
    images: torch.Tensor, generator: torch.Generator, *, flip: bool = True, min_crop: float = 1.0
) -> torch.Tensor:
    """Randomly flipped and cropped copies of uint8 images (B, H, W, C), the whole batch at once.

    ``flip``: each image is mirrored left-right with probability 1/2. ``min_crop < 1``: each
    image is replaced by a random square crop whose side is a uniform fraction in
    [min_crop, 1] of the image's, at a uniform position, resized back by bilinear sampling.
    The random numbers come from ``generator`` (on the CPU), so a seeded run repeats itself.
    """
    n = len(images)
    if flip:
        mirrored = (torch.rand(n, generator=generator) < 0.5).to(images.device)
        images = torch.where(mirrored[:, None, None, None], images.flip(2), images)  # NHWC: axis 2 is width
    if min_crop < 1.0:
        scale = min_crop + (1.0 - min_crop) * torch.rand(n, generator=generator)  # side fraction
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (1 - scale)[:, None]  # centre, in [-1, 1] units
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = scale
        theta[:, :, 2] = shift
        x = images.permute(0, 3, 1, 2).float()  # (B, C, H, W)
        grid = F.affine_grid(theta.to(images.device), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        images = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return images
