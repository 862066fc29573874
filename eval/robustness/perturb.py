"""Image perturbations for the selection-stability report, and where a pixel box lands on the visual-token grid.

Perturbations are named by short specs so that runs are reproducible from the command line:

* ``noise:S``        Gaussian pixel noise of standard deviation S/255, added then rounded and clipped to 8 bits.
* ``patch-noise:P``  a P x P pixel square of uniform random colours in the top-left corner of the image.
* ``patch-solid:P``  the same square filled with one solid colour (``SOLID``, a colour no object has).

Every random draw comes from ``numpy.random.default_rng((seed, index))``, so a perturbed image depends only on the
run seed and the example's index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .args import DEFAULT_PERTURBATIONS

SOLID = (0, 0, 0)  # black: in no scene (objects are saturated colours on white)
KINDS = ("noise", "patch-noise", "patch-solid")


@dataclass(frozen=True)
class Perturbation:
    kind: str  # one of KINDS
    size: float  # noise: sigma in 1/255 units; patch: side in pixels

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.size:g}"

    @property
    def is_patch(self) -> bool:
        return self.kind.startswith("patch")

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the patch in pixels (top-left corner, clipped to the image)."""
        side = int(self.size)
        return 0, 0, min(side, width), min(side, height)


def parse_perturbation(spec: str) -> Perturbation:
    kind, _, size = spec.partition(":")
    try:
        value = float(size)
    except ValueError:
        value = -1.0
    if kind not in KINDS or value < 0 or (kind != "noise" and value != int(value)):
        raise ValueError(
            f"unknown perturbation {spec!r}; expected noise:SIGMA (in 1/255), patch-noise:PIXELS or "
            f"patch-solid:PIXELS, e.g. {','.join(DEFAULT_PERTURBATIONS)}"
        )
    return Perturbation(kind, value)


def perturb(image: Image.Image, p: Perturbation, seed: int, index: int) -> Image.Image:
    """A perturbed copy of an RGB image (8-bit, like any image a user would feed the model)."""
    rng = np.random.default_rng((seed, index))
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    if p.kind == "noise":
        noisy = arr.astype(np.float64) + rng.normal(0.0, p.size, arr.shape)
        arr = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    else:
        x0, y0, x1, y1 = p.box(arr.shape[1], arr.shape[0])
        if p.kind == "patch-noise":
            arr[y0:y1, x0:x1] = rng.integers(0, 256, (y1 - y0, x1 - x0, 3), dtype=np.uint8)
        else:
            arr[y0:y1, x0:x1] = SOLID
    return Image.fromarray(arr)


def token_frame(processor, width: int, height: int) -> tuple[float, float, float, float]:
    """The rectangle (x0, y0, x1, y1), in the original image's pixels, that the single-image token grid covers.

    LLaVA-style processors with ``do_pad`` pad to a square (the image centred, offset ``(side - short) // 2``)
    before resizing, so the grid reaches into the padding; a centre crop smaller than the resized square cuts
    the frame in proportion. Qwen-style processors resize the image itself to the grid, so the frame is the image.
    """
    ip = processor.image_processor
    x0, y0, x1, y1 = 0.0, 0.0, float(width), float(height)
    if getattr(ip, "do_pad", False) and width != height:
        side = max(width, height)
        dx, dy = (side - width) // 2, (side - height) // 2
        x0, y0, x1, y1 = -dx, -dy, side - dx, side - dy
        size, crop = getattr(ip, "size", None) or {}, getattr(ip, "crop_size", None) or {}
        resized = size.get("shortest_edge") or size.get("height")
        cropped = crop.get("height") if getattr(ip, "do_center_crop", False) else None
        if resized and cropped and cropped < resized:
            cut = (x1 - x0) * (1 - cropped / resized) / 2
            x0, y0, x1, y1 = x0 + cut, y0 + cut, x1 - cut, y1 - cut
    return x0, y0, x1, y1


def cell_coverage(frame, grid: tuple[int, int], box) -> torch.Tensor:
    """Share of each token cell's area inside ``box``.

    frame: (x0, y0, x1, y1) the grid covers; grid: (rows, cols); box: (x0, y0, x1, y1) in the same pixels.
    Returns [rows * cols] float64 in raster order (the visual tokens' order), each in [0, 1].
    """
    fx0, fy0, fx1, fy1 = frame
    rows, cols = grid
    xs = torch.linspace(fx0, fx1, cols + 1, dtype=torch.float64)
    ys = torch.linspace(fy0, fy1, rows + 1, dtype=torch.float64)
    over_x = (torch.clamp(xs[1:], max=box[2]) - torch.clamp(xs[:-1], min=box[0])).clamp(min=0) / (xs[1:] - xs[:-1])
    over_y = (torch.clamp(ys[1:], max=box[3]) - torch.clamp(ys[:-1], min=box[1])).clamp(min=0) / (ys[1:] - ys[:-1])
    return (over_y[:, None] * over_x[None, :]).flatten()
