"""Augmentation on batched image tensors (on the device, seeded): trainer.augment at train
time, eval.tta's views at test time."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def affine_matrices(
    n: int,
    generator: torch.Generator,
    degrees: float = 10.0,
    translate: float = 0.1,
    scale: tuple[float, float] = (0.9, 1.1),
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """n random small affine maps as affine_grid's matrices [n, 2, 3]: a rotation of up to
    `degrees` either way, a scale in `scale` and a shift of up to `translate` of the image
    side each way, drawn from `generator` (on `device`)."""

    def uniform(*shape, low=-1.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=generator, device=device)

    angle = uniform(n) * math.radians(degrees)
    inv_scale = 1.0 / uniform(n, low=scale[0], high=scale[1])
    shift = uniform(n, 2) * 2 * translate  # grid coordinates span [-1, 1]
    cos, sin = torch.cos(angle) * inv_scale, torch.sin(angle) * inv_scale
    return torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], -1), torch.stack([sin, cos, shift[:, 1]], -1)], 1
    )


def warp(
    x: torch.Tensor, theta: torch.Tensor, displacement: torch.Tensor | None = None
) -> torch.Tensor:
    """Images x float [N, C, H, W] under affine_grid matrices theta [N, 2, 3] (or one
    [2, 3] for all), plus a displacement of the sampling grid [N, H, W, 2] if given (e.g.
    elastic_field's), in one bilinear resampling, zero outside the frame (the background
    of metarun's character images)."""
    theta = theta.to(x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if displacement is not None:
        grid = grid + displacement.to(x.dtype)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def random_affine(
    x: torch.Tensor,
    generator: torch.Generator,
    degrees: float = 10.0,
    translate: float = 0.1,
    scale: tuple[float, float] = (0.9, 1.1),
) -> torch.Tensor:
    """Rotate, scale and shift each image by a small random amount.

    x: float [N, C, H, W]. translate is a fraction of the image side.
    One affine_grid + grid_sample over the whole batch; the draws come from
    `generator`, so a seeded sampler stays reproducible.
    """
    return warp(x, affine_matrices(x.shape[0], generator, degrees, translate, scale, x.device))


def elastic_field(
    n: int,
    size: tuple[int, int],
    generator: torch.Generator,
    magnitude: float = 0.1,
    cells: int = 3,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """n smooth random displacement fields for grid_sample's grids, [n, H, W, 2] in grid
    units (the image spans [-1, 1]): a displacement of up to `magnitude` each way drawn at
    each point of a `cells` x `cells` lattice, interpolated bicubically over the image. At
    28 pixels magnitude 0.1 moves a point of the lattice by up to 1.4 pixels; neighbouring
    pixels move together, so strokes bend instead of breaking (Simard et al. 2003's
    distortions of handwriting, with a coarse lattice instead of a smoothed pixel field)."""
    coarse = magnitude * (
        2 * torch.rand(n, 2, cells, cells, generator=generator, device=device) - 1
    )
    field = F.interpolate(coarse, size=size, mode="bicubic", align_corners=True)
    return field.permute(0, 2, 3, 1)


def random_distortion(
    x: torch.Tensor, generator: torch.Generator, affine: bool = True, elastic: bool = False
) -> torch.Tensor:
    """trainer.augment's geometric distortions in one resampling: a small random affine map
    (affine_matrices' defaults) and/or a smooth elastic displacement (elastic_field's), so
    that an image combining both is interpolated once, not blurred twice. x float
    [N, C, H, W]; the affine draws come first, so affine alone draws what random_affine
    does."""
    n, _, h, w = x.shape
    if affine:
        theta = affine_matrices(n, generator, device=x.device)
    else:
        theta = torch.eye(2, 3, device=x.device)
    field = elastic_field(n, (h, w), generator, device=x.device) if elastic else None
    return warp(x, theta, field)


def random_stroke(
    x: torch.Tensor, generator: torch.Generator, strength: float = 0.5
) -> torch.Tensor:
    """Thicken or thin each image's strokes by a random amount, as pens and people differ:
    x float [N, C, H, W] moves toward its 3x3 grey dilation (t > 0) or erosion (t < 0) by
    |t| * `strength`, t uniform in [-1, 1] per image. Symmetric in t, so it suits strokes
    brighter or darker than the background alike."""
    t = 2 * torch.rand(x.shape[0], 1, 1, 1, generator=generator, device=x.device) - 1
    dilated = F.max_pool2d(x, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-x, 3, stride=1, padding=1)
    target = torch.where(t > 0, dilated, eroded)
    return x + strength * t.abs().to(x.dtype) * (target - x)


def tta_views(views: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """eval.tta's views [views, 2, 3]: the identity, then views - 1 random small affine maps
    (those of trainer.augment=affine) drawn from `seed` alone, so every episode, batch size
    and run with the same eval.seed sees the same views, and more views add to fewer."""
    generator = torch.Generator().manual_seed(seed)
    # one view at a time, so that more views extend the list (tta=8's views hold tta=4's)
    drawn = [affine_matrices(1, generator) for _ in range(views - 1)]
    return torch.cat([torch.eye(2, 3)[None], *drawn]).to(device)


def random_shift(
    x: torch.Tensor, generator: torch.Generator, translate: float = 0.1
) -> torch.Tensor:
    """Shift each image by a random whole number of pixels, up to `translate` of its side
    (at least 1) each way, filling with zeros: x float [N, C, H, W]. Cheaper than
    random_affine (two gathers, no interpolation) and lossless inside the frame."""
    n, c, h, w = x.shape
    s = max(1, round(translate * max(h, w)))
    offset = torch.randint(0, 2 * s + 1, (n, 2), generator=generator, device=x.device)
    padded = F.pad(x, (s, s, s, s))
    rows = offset[:, :1] + torch.arange(h, device=x.device)  # [N, H] rows of the padded image
    cols = offset[:, 1:] + torch.arange(w, device=x.device)
    padded = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * s))
    return padded.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def random_mirror(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror (left-right) every image of a class together, each class with probability 1/2:
    x float [tasks, way, k, C, H, W]. A mirrored character is a new character, so this adds
    classes (with 4 rotations: all 8 symmetries of the square), like the rotations do."""
    flip = torch.rand(x.shape[:2], generator=generator, device=x.device) < 0.5
    return torch.where(flip[..., None, None, None, None], x.flip(-1), x)
