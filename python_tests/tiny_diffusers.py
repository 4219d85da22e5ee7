"""Tiny random diffusers components built from configs (no downloads), seeded: the same weights
at every call. Test helpers of the CLI and adapter tests (diffusers is an optional extra: import
this module after ``pytest.importorskip("diffusers")``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import torch
from diffusers import (
    DDPMPipeline,
    DDPMScheduler,
    DiTTransformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)

SIZE = 8  # the sample size of every component


def tiny_unet(seed: int = 0, channels: int = 3, **config) -> UNet2DModel:
    """A ``UNet2DModel`` in eval mode without gradients: SIZE x SIZE samples with ``channels``
    channels in and out, two plain blocks of 8 and 16 channels, one layer each; ``config``
    overrides or adds any ``UNet2DModel`` option. Its weights are drawn right after
    ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    options = dict(
        sample_size=SIZE,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    return UNet2DModel(**{**options, **config}).eval().requires_grad_(False)


def tiny_cond_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
    ).eval()


def tiny_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=4,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        sample_size=SIZE,
        patch_size=2,
        num_embeds_ada_norm=10,
    ).eval()


def tiny_vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=SIZE,
    ).eval()


def tiny_pipeline(folder: Path) -> Path:
    """``folder`` holding a DDPMPipeline of :func:`tiny_unet` and a 1000-step DDPMScheduler, as
    diffusers' ``save_pretrained`` writes it."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    DDPMPipeline(unet=tiny_unet(), scheduler=scheduler).save_pretrained(folder)
    return folder


def edited_copy(src: Path, dst: Path, file: str, **changes) -> Path:
    """A copy of the pipeline folder ``src`` at ``dst`` with keys of one JSON file changed (a
    value of None removes the key)."""
    shutil.copytree(src, dst)
    p = dst / file
    cfg = json.loads(p.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    p.write_text(json.dumps(cfg))
    return dst
