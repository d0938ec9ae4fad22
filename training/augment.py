"""Training augmentations that keep the label true, on whole batches in torch.

The label is the band's colour name, so everything here changes geometry,
sharpness, noise and overall light, and never hue beyond what a white-balance
error does: a hue rotation could turn orange into yellow or navy into purple
and teach the model a wrong answer. The light and camera changes (exposure,
white balance, tone curve, saturation) span the same ranges as the
simulator's randomised scenes, applied to the whole crop: a colour cast moves
belt, metal and band together, so the model learns to read the band against
the bare metal beside it rather than in absolute terms. With a few dozen crops
from a few dozen scenes, this is what teaches it light it has not seen.

Crops come from the locator with the screw's axis horizontal, so flips and a
180° turn (both flips) give views the daemon really sees; the small affine
covers the locator's angle and centring error.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.recipe import AugmentConfig


def augment(
    crops: torch.Tensor, generator: torch.Generator, cfg: AugmentConfig | None = None
) -> torch.Tensor:
    """uint8 BGR ``(N, S, S, 3)`` -> augmented float ``(N, S, S, 3)`` in 0..255, whole values.

    Rounded to whole values so the model trains on exactly what a uint8 input
    can carry at run time. Random draws come from ``generator`` (on the CPU),
    so a seed gives the same augmentations every run.
    """
    cfg = cfg or AugmentConfig()
    n = crops.shape[0]
    device = crops.device
    x = crops.permute(0, 3, 1, 2).float()  # NCHW, still BGR

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return (torch.rand(n, *shape, generator=generator) * (high - low) + low).to(device)

    def coin(p: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) < p).to(device)

    # Geometry: flips (both = 180°) and a small rotation, shift and scale, in one warp
    angle = uniform(-cfg.max_rotate_deg, cfg.max_rotate_deg) * (math.pi / 180)
    scale = uniform(*cfg.scale_range)
    flip_x = torch.where(coin(cfg.flip_p), -1.0, 1.0)
    flip_y = torch.where(coin(cfg.flip_p), -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack(
                [cos * flip_x, -sin * flip_y, uniform(-cfg.max_shift, cfg.max_shift) * 2], 1
            ),
            torch.stack(
                [sin * flip_x, cos * flip_y, uniform(-cfg.max_shift, cfg.max_shift) * 2], 1
            ),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    # Blur: one sigma per batch, applied to a random subset
    blur = coin(cfg.blur_p)
    if blur.any():
        sigma = 0.4 + torch.rand(1, generator=generator).item() * (cfg.max_blur_sigma - 0.4)
        x[blur] = _gaussian_blur(x[blur], sigma)

    # Light: brightness, contrast about the crop's mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = uniform(*cfg.contrast).view(n, 1, 1, 1)
    brightness = uniform(*cfg.brightness).view(n, 1, 1, 1)
    x = ((x - mean) * contrast + mean) * brightness

    # Camera: white balance on the whole crop (belt, metal and band move together,
    # as under a real colour cast), then saturation about each pixel's grey,
    # then the tone curve
    t = uniform(-cfg.temperature, cfg.temperature)
    g = uniform(-cfg.tint, cfg.tint)
    gains = torch.exp(torch.stack([g - t, -g, g + t], 1)).view(n, 3, 1, 1)  # B, G, R
    x = (x * gains).clamp(0, 255)
    grey = x.mean(dim=1, keepdim=True)
    x = grey + (x - grey) * uniform(*cfg.saturation).view(n, 1, 1, 1)
    gamma = uniform(*cfg.gamma).view(n, 1, 1, 1)
    x = 255.0 * (x.clamp(0, 255) / 255.0) ** gamma

    # Sensor noise
    noisy = coin(cfg.noise_p).view(n, 1, 1, 1)
    std = uniform(0.0, cfg.max_noise_std).view(n, 1, 1, 1)
    noise = torch.randn(x.shape, generator=generator).to(device) * std
    x = torch.where(noisy, x + noise, x)

    return x.clamp(0, 255).round().permute(0, 2, 3, 1)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, horizontal, groups=channels)
    return F.conv2d(x, vertical, groups=channels)
