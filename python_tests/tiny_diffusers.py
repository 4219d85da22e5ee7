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


def tiny_cond_unet(sample_size: int = SIZE) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=sample_size,
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


def tiny_dit(num_classes: int = 10, out_channels: int = 4, seed: int = 0) -> DiTTransformer2DModel:
    """A one-layer DiT on SIZE x SIZE latents with 4 channels (``out_channels=8``: a learned
    variance, as DiT-XL-2); ``num_classes=1000`` embeds DiTPipeline's null class 1000."""
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=4,
        in_channels=4,
        out_channels=out_channels,
        num_layers=1,
        sample_size=SIZE,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
    ).eval()


def tiny_vae(blocks: int = 1, **config):
    """A 4-channel AutoencoderKL of SIZE x SIZE images; ``blocks`` levels (latents SIZE /
    2 ** (blocks - 1) wide: diffusers' vae_scale_factor)."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=(8,) * blocks,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=SIZE,
        **config,
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


# ----------------------------------------------------------------------------- text pipelines
TEXT_LENGTH = 8  # the tokenizer's model_max_length and the text encoder's positions


def tiny_clip_tokenizer():
    """A CLIP tokenizer built in memory: one token per byte (with and without CLIP's end-of-word
    mark), no merges, ``TEXT_LENGTH`` tokens per prompt."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
            vocab[c + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TEXT_LENGTH)


def tiny_clip_text_encoder(seed: int = 0, projection: bool = False, hidden: int = 8):
    """A one-layer CLIP text encoder of width ``hidden`` for :func:`tiny_clip_tokenizer`
    (``projection``: ``CLIPTextModelWithProjection``, as SD3's, projecting to ``hidden``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=2 + 2 * 256,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=TEXT_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def tiny_sd_pipeline(scheduler=None):
    """A ``StableDiffusionPipeline`` of tiny parts (SIZE / 2 x SIZE / 2 latents with 4
    channels, a VAE of scale factor 2: SIZE x SIZE images, diffusers' smallest height), no safety
    checker, progress bar off; the scheduler's default is DDPM with the settings the pipeline
    would set itself (steps_offset=1, clip_sample=False)."""
    from diffusers import StableDiffusionPipeline

    if scheduler is None:
        scheduler = DDPMScheduler(steps_offset=1, clip_sample=False)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(blocks=2),
        text_encoder=tiny_clip_text_encoder(),
        tokenizer=tiny_clip_tokenizer(),
        unet=tiny_cond_unet(SIZE // 2),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_dit_pipeline(scheduler=None, out_channels: int = 8):
    """A ``DiTPipeline`` of :func:`tiny_dit` with 1000 classes (DiTPipeline's null class 1000
    embedded) and a learned variance by default, progress bar off."""
    from diffusers import DiTPipeline

    pipe = DiTPipeline(
        transformer=tiny_dit(num_classes=1000, out_channels=out_channels),
        vae=tiny_vae(),
        scheduler=DDPMScheduler() if scheduler is None else scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(scheduler=None):
    """A ``StableDiffusion3Pipeline`` of tiny parts: a one-layer ``SD3Transformer2DModel`` on
    SIZE / 2 x SIZE / 2 latents with 4 channels (patch 2: 4 image tokens), two tiny CLIP text
    encoders with projection (width 8 each: joint attention and pooled projections of 16), no T5
    (``text_encoder_3=None``: the pipeline's zeros), a VAE of scale factor 2 with SD3's scaling
    and shift factors; the scheduler's default is
    ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, shift=3.0)``. Progress bar off."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    if scheduler is None:
        scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, shift=3.0)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=SIZE // 2,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        pos_embed_max_size=SIZE,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=tiny_vae(blocks=2, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=tiny_clip_text_encoder(1, projection=True),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_clip_text_encoder(2, projection=True),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
