"""The embedded ``patches`` model: a real diffusers ``DDPMPipeline`` (``UNet2DModel`` +
``DDPMScheduler``) trained by this project on 32x32 RGB crops of photographs.

Data: the colour photographs that scikit-image ships inside its wheel (``skimage.data``, read
from the installed package, never downloaded): ``astronaut``, ``chelsea``, ``coffee``,
``rocket`` and the left view of ``stereo_motorcycle`` (:data:`IMAGES`). Each image is split
into a training region (the left ``1 - HELDOUT_FRACTION`` of its columns) and a held-out region
(the rightmost ``HELDOUT_FRACTION`` of its columns); a crop lies entirely inside one region, so
held-out crops share the training distribution but no pixel with it. Crops are drawn uniformly
over all valid (image, top-left corner) positions of a region, flipped horizontally with
probability 1/2 and scaled ``v / 127.5 - 1`` to [-1, 1] (:func:`random_crops`,
:func:`heldout_crops`), always from an explicit seeded ``torch.Generator``.

Model: ``UNet2DModel`` with :data:`UNET_CONFIG` (1.53 M parameters; attention only at 8x8,
where it is cheap), epsilon prediction, ``DDPMScheduler`` with :data:`SCHEDULER_CONFIG` (1000
linear betas 1e-4..0.02, ``clip_sample=True``). The shipped folder (:func:`pipeline_dir`) is
diffusers' own ``save_pretrained`` layout (``model_index.json``, ``unet/``, ``scheduler/``,
safetensors) holding the EMA weights, and loads with
``diffusers.DDPMPipeline.from_pretrained(pipeline_dir())`` (:func:`load_pipeline`). Train it
with ``python -m specdiff_kernels.models.train patches``.

Quality helpers (used by ``bench/patches_quality.py``): :func:`channel_stats` and
:func:`radial_power_spectrum`.

scikit-image and diffusers are imported inside the functions that need them
(``pip install 'specdiff_kernels[patches]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..validate import as_int

__all__ = [
    "CROP",
    "HELDOUT_FRACTION",
    "IMAGES",
    "SCHEDULER_CONFIG",
    "TRAIN_COMMAND",
    "UNET_CONFIG",
    "build_scheduler",
    "build_unet",
    "channel_stats",
    "heldout_crops",
    "load_images",
    "load_pipeline",
    "pipeline_dir",
    "radial_power_spectrum",
    "random_crops",
]

CROP = 32
#: rightmost fraction of every image's columns reserved for held-out crops
HELDOUT_FRACTION = 0.2
#: ``skimage.data`` colour photographs stored in the scikit-image wheel (no pooch download)
IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left")
TRAIN_COMMAND = "python -m specdiff_kernels.models.train patches --into-package"

UNET_CONFIG: dict = {
    "sample_size": CROP,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64, 64),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    # 8 groups: the diffusers default of 32 would leave one channel per group at width 32
    "norm_num_groups": 8,
}

SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "variance_type": "fixed_small",
}


def pipeline_dir() -> Path:
    """The packaged pipeline folder ``specdiff_kernels/models/weights/patches/``."""
    return Path(__file__).resolve().parent / "weights" / "patches"


def build_unet(seed: Optional[int] = None):
    """A freshly initialised ``UNet2DModel`` with :data:`UNET_CONFIG` (seeded if ``seed``)."""
    from diffusers import UNet2DModel

    if seed is not None:
        torch.manual_seed(int(seed))
    return UNet2DModel(**UNET_CONFIG)


def build_scheduler():
    """The training ``DDPMScheduler`` (:data:`SCHEDULER_CONFIG`)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def load_pipeline(device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32):
    """The shipped ``diffusers.DDPMPipeline`` (EMA weights; UNet in eval mode, no grad)."""
    folder = pipeline_dir()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"patches pipeline not found at {folder}; train it with `{TRAIN_COMMAND}`"
        )
    from diffusers import DDPMPipeline
    from diffusers.utils import logging as dlog

    # diffusers would print a multi-line "install accelerate" notice and a progress bar for
    # loading two small components; low_cpu_mem_usage=False is what it falls back to anyway
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    try:
        pipe = DDPMPipeline.from_pretrained(str(folder), torch_dtype=dtype, low_cpu_mem_usage=False)
    finally:
        dlog.set_verbosity(level)
        dlog.enable_progress_bar()
    pipe = pipe.to(device)
    pipe.unet.eval()
    pipe.unet.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
_IMAGE_CACHE: dict = {}


def load_images() -> list[Tensor]:
    """The photographs of :data:`IMAGES` as uint8 tensors ``[3, H, W]`` (cached)."""
    if "images" not in _IMAGE_CACHE:
        import skimage.data as sd

        out = []
        for name in IMAGES:
            arr = sd.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(sd, name)()
            arr = np.ascontiguousarray(arr[..., :3])
            if arr.dtype != np.uint8 or arr.ndim != 3:
                raise RuntimeError(
                    f"skimage.data.{name}: expected an RGB uint8 image, got {arr.dtype} {arr.shape}"
                )
            out.append(torch.from_numpy(arr).permute(2, 0, 1).contiguous())
        _IMAGE_CACHE["images"] = out
    return _IMAGE_CACHE["images"]


def _region(img: Tensor, heldout: bool) -> Tensor:
    W = img.shape[-1]
    split = int(round(W * (1.0 - HELDOUT_FRACTION)))
    return img[:, :, split:] if heldout else img[:, :, :split]


def _crop_positions(n: int, generator: torch.Generator, heldout: bool):
    """``(which, ys, xs, flip)``: image index, top-left corner in region coordinates and
    horizontal flip of ``n`` crops."""
    n = as_int("n", n, 0)
    regions = [_region(im, heldout) for im in load_images()]
    # (H - CROP + 1) * (W - CROP + 1) corners per region: weighting images by it makes every
    # valid crop equally likely, so large images are not under-represented
    ny = torch.tensor([r.shape[1] - CROP + 1 for r in regions], dtype=torch.int64)
    nx = torch.tensor([r.shape[2] - CROP + 1 for r in regions], dtype=torch.int64)
    weights = (ny * nx).to(torch.float64)
    which = (
        torch.multinomial(weights, n, replacement=True, generator=generator)
        if n
        else torch.zeros(0, dtype=torch.int64)
    )
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    ys = (u[:, 0] * ny[which]).floor().to(torch.int64)
    xs = (u[:, 1] * nx[which]).floor().to(torch.int64)
    flip = torch.rand(n, generator=generator) < 0.5
    return which, ys, xs, flip


def _crops(n: int, generator: torch.Generator, heldout: bool) -> Tensor:
    which, ys, xs, flip = _crop_positions(n, generator, heldout)
    regions = [_region(im, heldout) for im in load_images()]
    out = torch.empty(n, 3, CROP, CROP, dtype=torch.uint8)
    for i in range(n):
        r = regions[int(which[i])]
        y, x = int(ys[i]), int(xs[i])
        out[i] = r[:, y : y + CROP, x : x + CROP]
    out[flip] = out[flip].flip(-1)
    return out.to(torch.float32) / 127.5 - 1.0


def random_crops(n: int, generator: torch.Generator) -> Tensor:
    """``n`` training crops ``[n, 3, 32, 32]`` float32 in [-1, 1] (random horizontal flips)."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return _crops(n, generator, heldout=False)


def heldout_crops(n: int, seed: int = 0) -> Tensor:
    """``n`` crops ``[n, 3, 32, 32]`` in [-1, 1] from the held-out regions (never trained on),
    drawn like the training crops; the same ``seed`` gives the same crops."""
    seed = as_int("seed", seed)
    return _crops(n, torch.Generator().manual_seed(seed), heldout=True)


# --------------------------------------------------------------------------------------------
# quality helpers
# --------------------------------------------------------------------------------------------
def _as_numpy_images(x) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, np.float64)
    if a.ndim == 2:
        a = a[None, None]
    elif a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise ValueError(f"x must be [H, W], [C, H, W] or [N, C, H, W], got shape {a.shape}")
    return a


def channel_stats(x) -> dict:
    """Per-channel mean and standard deviation over all images and pixels.

    ``x``: ``[N, C, H, W]`` (or ``[C, H, W]``) tensor or array. Returns
    ``{"mean": ndarray[C], "std": ndarray[C]}`` (float64; std with ``ddof=0``).
    """
    a = _as_numpy_images(x)
    return {"mean": a.mean(axis=(0, 2, 3)), "std": a.std(axis=(0, 2, 3))}


def radial_power_spectrum(x) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum, averaged over images and channels.

    ``x``: ``[N, C, H, W]``, ``[C, H, W]`` or ``[H, W]`` tensor or array. Each image channel's
    2-D DFT is normalised by ``sqrt(H * W)`` (so white noise of variance s^2 has expected power
    s^2 at every frequency, and a constant c has power ``c^2 H W`` at DC and 0 elsewhere);
    ``|F|^2`` is averaged over the annuli ``round(|k|) = r`` for integer radii
    ``r = 0 .. min(H, W) // 2`` (``k`` in cycles per image; the corners beyond the
    Nyquist radius are dropped). Returns ``(freq, power)``: ``freq = r / min(H, W)`` in cycles
    per pixel and ``power[r]``, both float64 arrays of length ``min(H, W) // 2 + 1``.
    """
    a = _as_numpy_images(x)
    H, W = a.shape[-2:]
    F = np.fft.fft2(a, axes=(-2, -1)) / np.sqrt(H * W)
    P = (np.abs(F) ** 2).mean(axis=(0, 1))
    ky = np.fft.fftfreq(H) * H
    kx = np.fft.fftfreq(W) * W
    r = np.rint(np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)).astype(np.int64)
    R = min(H, W) // 2
    keep = r <= R
    sums = np.bincount(r[keep], weights=P[keep], minlength=R + 1)
    counts = np.bincount(r[keep], minlength=R + 1)
    return np.arange(R + 1) / min(H, W), sums / counts
