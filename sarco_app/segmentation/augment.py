"""Training augmentation of working-spacing slices (SynthSeg-like, so a model trained on phantoms
copes with real scanners).

* geometry (:func:`sample_crop`): rotation, isotropic and anisotropic scale (pixel-spacing
  errors), translation, left-right flip (the anterior-posterior axis is never flipped: anatomy is
  not symmetric);
* intensity, in HU (:func:`augment_intensity`): a random offset per tissue class (muscle density
  varies between people, myosteatosis), global HU shift and contrast, a smooth bias field, blur,
  lower resolution (3 mm pixels), white and correlated noise;
* :func:`relabel_muscle_by_hu`: the muscle compartment re-split by HU after the intensity moved
  pixels across -29 HU.

Every random draw comes from the ``torch.Generator`` passed in, so a crop is reproducible from
its generator's seed (:class:`sarco_app.segmentation.training_data.CropBatches`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sarco_app import labels as L

#: HU of air: the value outside the image after a geometric transform.
AIR = -1024.0


def smooth_noise(shape: tuple[int, int], cells: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth random field in [-1, 1] from a coarse ``cells x cells`` grid (bicubic)."""
    coarse = torch.rand((1, 1, cells, cells), generator=gen) * 2 - 1
    return F.interpolate(coarse, size=shape, mode="bicubic", align_corners=True)[0, 0].clamp(-1, 1)


def gauss_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, 1, H, W)`` with ``sigma`` pixels."""
    if sigma < 0.2:
        return x
    radius = int(math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def sample_crop(
    hu: torch.Tensor, lab: torch.Tensor, crop: int, gen: torch.Generator, augment: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``crop x crop`` patch of a working-spacing slice with geometric augmentation.

    The patch centre is drawn near the body (label or tissue pixels); out-of-image pixels are
    air. Returns HU ``(crop, crop)`` and label ``(crop, crop)`` (long).
    """
    H, W = hu.shape
    tissue = torch.nonzero(hu > -500)
    if len(tissue) == 0:
        tissue = torch.tensor([[H // 2, W // 2]])
    centre = tissue[torch.randint(len(tissue), (1,), generator=gen)].float()[0]
    body_centre = tissue.float().mean(0)
    # Pull the centre toward the body's centre so most crops show enough context.
    centre = 0.7 * centre + 0.3 * body_centre
    if augment:
        angle = (torch.rand(1, generator=gen).item() * 2 - 1) * math.radians(15)
        scale = math.exp((torch.rand(1, generator=gen).item() * 2 - 1) * math.log(1.2))
        aniso = math.exp((torch.rand(1, generator=gen).item() * 2 - 1) * math.log(1.08))
        flip = torch.rand(1, generator=gen).item() < 0.5
        centre = centre + (torch.rand(2, generator=gen) * 2 - 1) * 12
    else:
        angle, scale, aniso, flip = 0.0, 1.0, 1.0, False
    # Output pixel offsets -> input pixel coordinates: p_in = centre + A @ offset.
    offs = torch.arange(crop, dtype=torch.float32) - (crop - 1) / 2
    ou, ov = torch.meshgrid(offs, offs, indexing="ij")
    c, s = math.cos(angle), math.sin(angle)
    sx, sy = 1 / (scale * aniso), 1 / (scale / aniso)
    if flip:
        ou = -ou
    pu = centre[0] + c * sx * ou - s * sy * ov
    pv = centre[1] + s * sx * ou + c * sy * ov
    # grid_sample: last grid dim is (x = along W, y = along H), normalised, align_corners=False.
    grid = torch.stack([(pv + 0.5) / W * 2 - 1, (pu + 0.5) / H * 2 - 1], dim=-1)[None]
    hu_out = F.grid_sample((hu - AIR)[None, None], grid, mode="bilinear", align_corners=False)[0, 0] + AIR
    lab_out = F.grid_sample(lab.float()[None, None], grid, mode="nearest", align_corners=False)[0, 0]
    return hu_out, lab_out.long()


def augment_intensity(hu: torch.Tensor, lab: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """HU intensity augmentation of a batch ``(N, H, W)`` given its labels ``(N, H, W)``."""
    out = hu.clone()
    n, H, W = hu.shape
    rnd = lambda: torch.rand(1, generator=gen).item()  # noqa: E731
    for i in range(n):
        x = out[i]
        body = x > -500
        # Per-tissue HU offsets (muscle density varies most: myosteatosis, contrast phase).
        offsets = torch.zeros(L.NUM_CLASSES + len(L.ORGAN_NAMES))
        offsets[L.MUSCLE] = (rnd() * 2 - 1) * 25
        offsets[L.SAT] = (rnd() * 2 - 1) * 15
        offsets[L.VAT] = (rnd() * 2 - 1) * 15
        offsets[L.IMAT] = (rnd() * 2 - 1) * 20
        if int(lab[i].max()) >= L.NUM_CLASSES:
            # Organ classes (training with organ maps): every organ its own shift, so liver,
            # spleen and bowel wall cross the muscle range as they do between contrast phases.
            for k in range(L.NUM_CLASSES, len(offsets)):
                offsets[k] = (rnd() * 2 - 1) * 35
        offset_map = gauss_blur(offsets[lab[i]][None, None], 0.7)[0, 0]
        x = x + offset_map * body
        # Global contrast around water and HU shift (calibration, kernel differences).
        x = torch.where(body, x * (1 + (rnd() * 2 - 1) * 0.08) + (rnd() * 2 - 1) * 15, x)
        # Smooth bias field (beam hardening, cupping) inside the body.
        if rnd() < 0.5:
            x = x + smooth_noise((H, W), 4, gen) * (rnd() * 25) * body
        x = x[None, None]
        # Lower resolution: pixels up to 2x coarser (3 mm scans at a 1.5 mm working grid).
        if rnd() < 0.3:
            factor = 1 + rnd()
            small = (max(8, int(H / factor)), max(8, int(W / factor)))
            x = F.interpolate(F.interpolate(x, size=small, mode="area"), size=(H, W), mode="bilinear", align_corners=False)
        if rnd() < 0.3:
            x = gauss_blur(x, rnd() * 1.0)
        # Noise: white plus correlated (CT noise is not white), only where there is tissue.
        sigma = rnd() * 20
        noise = torch.randn((1, 1, H, W), generator=gen) * sigma
        noise = noise + gauss_blur(torch.randn((1, 1, H, W), generator=gen), 1.5) * rnd() * 30
        out[i] = (x + noise * (x > -500))[0, 0]
    return out


def relabel_muscle_by_hu(hu: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
    """Labels ``(N, H, W)`` with the muscle compartment (muscle or IMAT) re-split by the HU
    protocol on ``hu`` (:func:`sarco_app.labels.apply_hu_ranges`); SAT, VAT and background are
    kept. Used after intensity augmentation: offsets, blur and noise move pixels across -29 HU."""
    relabelled = torch.as_tensor(L.apply_hu_ranges(lab.numpy(), hu.numpy())).to(lab.dtype)
    compartment = (lab == L.MUSCLE) | (lab == L.IMAT)
    return torch.where(compartment, relabelled, lab)
