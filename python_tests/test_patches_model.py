"""The embedded ``patches`` pipeline: the packaged diffusers folder, its data and its quality helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("skimage")

from specdiff_kernels import SpeculativeSampler  # noqa: E402
from specdiff_kernels.integrations.diffusers import from_pipeline  # noqa: E402
from specdiff_kernels.models import patches as P  # noqa: E402
from specdiff_kernels.models import train as TR  # noqa: E402
from specdiff_kernels.testing import two_sample as stats


@pytest.fixture(scope="module")
def pipe(single_thread):
    return P.load_pipeline()


# ------------------------------------------------------------------ the packaged pipeline
def test_from_pretrained_loads_unet_and_ddpm_scheduler():
    pipe = diffusers.DDPMPipeline.from_pretrained(str(P.pipeline_dir()))
    assert isinstance(pipe, diffusers.DDPMPipeline)
    assert isinstance(pipe.unet, diffusers.UNet2DModel)
    assert isinstance(pipe.scheduler, diffusers.DDPMScheduler)
    u = pipe.unet.config
    assert (u.sample_size, u.in_channels, u.out_channels) == (32, 3, 3)
    assert tuple(u.block_out_channels) == (32, 64, 64, 64)
    assert tuple(u.down_block_types) == P.UNET_CONFIG["down_block_types"]
    assert u.layers_per_block == 1 and u.norm_num_groups == 8
    s = pipe.scheduler.config
    assert s.num_train_timesteps == 1000
    assert s.beta_schedule == "linear" and s.beta_start == 1e-4 and s.beta_end == 0.02
    assert s.prediction_type == "epsilon" and s.variance_type == "fixed_small"
    assert s.clip_sample is True and s.clip_sample_range == 1.0
    assert pipe.unet.dtype == torch.float32


def test_folder_layout_size_and_parameter_count():
    d = P.pipeline_dir()
    index = json.loads((d / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    weights = d / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file()
    assert not list(d.rglob("*.bin")), "weights must be stored as safetensors only"
    total = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    assert total <= 10 * 2**20, f"packaged folder is {total / 2**20:.2f} MiB > 10 MiB"
    from safetensors.torch import load_file

    state = load_file(str(weights))
    assert all(v.dtype == torch.float32 for v in state.values())
    n = sum(v.numel() for v in state.values())
    assert 1_000_000 <= n <= 2_000_000, n
    info = json.loads((d / "patches_train_info.json").read_text())
    assert info["params"] == n
    assert info["scheduler_config"]["num_train_timesteps"] == 1000


def test_load_pipeline_is_fp32_eval_and_frozen(pipe):
    assert isinstance(pipe, diffusers.DDPMPipeline)
    assert pipe.unet.dtype == torch.float32
    assert not pipe.unet.training
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_load_pipeline_prints_nothing(capfd):
    """No "install accelerate" notice, no loading bar: a user's stderr stays theirs."""
    P.load_pipeline()
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_load_pipeline_missing_folder_names_the_train_command(monkeypatch, tmp_path):
    monkeypatch.setattr(P, "pipeline_dir", lambda: tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="python -m specdiff_kernels.models.train patches"):
        P.load_pipeline()


def test_trained_weights_denoise_heldout_crops(pipe):
    """Held-out epsilon MSE far below 1 (the loss of predicting 0, i.e. of untrained weights) at
    every noise level (limits ~1.6-2.5x above what the shipped weights measure: 0.093, 0.011,
    0.0012), and at low / middle noise far below the best scalar shrinkage ``c * x_t`` (c fitted
    with the true noise: 0.92, 0.19), which knows nothing about image structure."""
    x0 = P.heldout_crops(64, seed=11)
    abar = pipe.scheduler.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    limits = {50: 0.15, 300: 0.025, 900: 0.003}
    got, shrink = {}, {}
    with torch.no_grad():
        for t in limits:
            eps = torch.randn(x0.shape, generator=g)
            a = abar[t]
            xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
            pred = pipe.unet(xt, torch.full((x0.shape[0],), t)).sample
            got[t] = (pred - eps).pow(2).mean().item()
            c = (xt * eps).sum() / (xt * xt).sum()
            shrink[t] = (c * xt - eps).pow(2).mean().item()
    assert all(got[t] < limits[t] for t in limits), got
    assert got[50] < 0.25 * shrink[50] and got[300] < 0.25 * shrink[300], (got, shrink)


# ------------------------------------------------------------------ data
def test_crops_are_deterministic_shaped_and_scaled():
    a, b = P.heldout_crops(16, seed=3), P.heldout_crops(16, seed=3)
    assert a.shape == (16, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, P.heldout_crops(16, seed=4))
    assert a.min() >= -1 and a.max() <= 1
    # uint8 values scaled v / 127.5 - 1: every value is on that grid
    v = (a + 1) * 127.5
    assert torch.allclose(v, v.round(), atol=1e-4)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(P.random_crops(8, g1), P.random_crops(8, g2))
    assert P.random_crops(0, g1).shape == (0, 3, 32, 32)


@pytest.mark.parametrize("heldout", [False, True])
def test_crops_come_from_their_region_with_random_flips(heldout):
    imgs = P.load_images()
    assert len(imgs) == len(P.IMAGES) and all(im.shape[0] == 3 for im in imgs)
    n, seed = 200, 2
    x = (
        P.heldout_crops(n, seed=seed)
        if heldout
        else P.random_crops(n, torch.Generator().manual_seed(seed))
    )
    which, ys, xs, flip = P._crop_positions(n, torch.Generator().manual_seed(seed), heldout)
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    for i in range(n):
        im = imgs[int(which[i])]
        split = int(round(im.shape[2] * 0.8))  # held-out: the right 20% of the columns
        x0 = int(xs[i]) + (split if heldout else 0)
        y0 = int(ys[i])
        assert 0 <= y0 and y0 + 32 <= im.shape[1]
        if heldout:
            assert x0 >= split and x0 + 32 <= im.shape[2]
        else:
            assert x0 >= 0 and x0 + 32 <= split
        ref = im[:, y0 : y0 + 32, x0 : x0 + 32]
        assert torch.equal(u8[i], ref.flip(-1) if flip[i] else ref)
    assert 0.35 < flip.float().mean() < 0.65
    # every image is used, roughly in proportion to its number of crop positions
    counts = torch.bincount(which, minlength=len(imgs))
    assert (counts > 0).all()


def test_bad_data_arguments():
    with pytest.raises(ValueError, match="n must"):
        P.heldout_crops(-1)
    with pytest.raises(TypeError, match="seed must"):
        P.heldout_crops(4, seed=1.5)
    with pytest.raises(TypeError, match="generator must"):
        P.random_crops(4, 0)


# ------------------------------------------------------------------ quality helpers
def test_white_noise_has_a_flat_spectrum_at_its_variance():
    x = 0.5 * torch.randn(512, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    freq, power = P.radial_power_spectrum(x)
    assert freq.shape == power.shape == (17,)
    np.testing.assert_allclose(freq, np.arange(17) / 32)
    # DC is one real mode per image (relative std sqrt(2 / 1536) = 3.6%): a looser bound
    assert power[0] == pytest.approx(0.25, rel=0.15)
    np.testing.assert_allclose(power[1:], 0.25, rtol=0.06)
    assert power[1:].max() / power[1:].min() < 1.15


def test_constant_image_has_power_only_at_dc():
    freq, power = P.radial_power_spectrum(np.full((2, 3, 32, 32), 0.3))
    assert power[0] == pytest.approx(0.09 * 32 * 32)
    np.testing.assert_allclose(power[1:], 0.0, atol=1e-20)


def test_sinusoid_power_sits_at_its_radius():
    xx = np.arange(32)
    img = np.cos(2 * np.pi * 5 * xx / 32)[None, :].repeat(32, 0)  # 5 cycles per image along x
    _, power = P.radial_power_spectrum(img)
    assert np.argmax(power) == 5
    # Parseval: mean square 0.5, carried by the two modes (+-5, 0) of the 32-mode r=5 annulus
    n5 = sum(
        1
        for a in range(32)
        for b in range(32)
        if round(np.hypot(min(a, 32 - a), min(b, 32 - b))) == 5
    )
    assert power[5] == pytest.approx(0.5 * 32 * 32 / n5)
    np.testing.assert_allclose(np.delete(power, 5), 0.0, atol=1e-20)


def test_channel_stats_on_known_input():
    x = torch.zeros(4, 3, 8, 8)
    x[:, 0] = 1.0
    x[:, 1] = -1.0
    x[:, 2, :, ::2], x[:, 2, :, 1::2] = 0.5, -0.5
    s = P.channel_stats(x)
    np.testing.assert_allclose(s["mean"], [1.0, -1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(s["std"], [0.0, 0.0, 0.5], atol=1e-12)
    with pytest.raises(ValueError, match="x must be"):
        P.channel_stats(np.zeros(5))


# ------------------------------------------------------------------ sampling
def test_speculative_matches_the_diffusers_pipeline_loop(pipe):
    """Speculative sampling through the adapter vs diffusers' own ``pipe(...)`` loop (N = 10):
    finite samples inside the clip range, and no evidence of a different law in per-image
    statistics. A smoke-level law check (24 samples each: it flags gross errors such as a lost
    clip or a wrong scale, not small shifts; measured p for a +0.2 shift was 0.008, for held-out
    crops vs 64 samples 0.004); the powered comparison is bench/patches_quality.py
    (192 vs 192 at N = 200)."""
    n, N = 24, 10
    model, transitions = from_pipeline(pipe, num_inference_steps=N)
    res = SpeculativeSampler(model, transitions, window=4).sample(
        n, (3, 32, 32), generator=torch.Generator().manual_seed(1)
    )
    xs = res.samples
    assert torch.isfinite(xs).all() and xs.abs().max() <= 1.0 + 1e-6
    # every round costs one sequential call and commits at least one step (at N = 10 the steps
    # are too coarse for long accepted runs, so no speed-up is asserted here)
    assert res.stats.target_calls <= N
    img = pipe(
        batch_size=n,
        num_inference_steps=N,
        output_type="np",
        generator=torch.Generator().manual_seed(2),
    ).images
    xp = torch.from_numpy(img).permute(0, 3, 1, 2) * 2 - 1
    # a stat per image: channel means and contrast (pixels are too many for 24 samples)
    feats = lambda x: torch.cat([x.mean((2, 3)), x.std((1, 2, 3))[:, None]], 1)  # noqa: E731
    p = stats.bonferroni(
        [
            stats.per_coordinate_ks_pvalue(feats(xs), feats(xp)),
            stats.energy_distance_pvalue(feats(xs), feats(xp), n_resamples=499),
        ]
    )
    assert p > 1e-3, p


# ------------------------------------------------------------------ training script
def test_train_patches_is_deterministic_and_loadable(tmp_path):
    from safetensors.torch import load_file

    prev = torch.get_num_threads()
    try:
        outs = []
        for k in range(2):
            out = tmp_path / f"run{k}"
            info = TR.train_patches(
                steps=2, batch=2, out=out, seed=7, threads=1, warmup=1, eval_crops=4, log_every=1
            )
            outs.append(load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors")))
        assert outs[0].keys() == outs[1].keys()
        assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
        fresh = P.build_unet(seed=8).state_dict()
        assert any(not torch.equal(outs[0][k], fresh[k]) for k in outs[0])
        loaded = diffusers.DDPMPipeline.from_pretrained(str(tmp_path / "run0"))
        assert loaded.scheduler.config.clip_sample is True
        assert info["steps"] == 2 and info["params"] == sum(v.numel() for v in outs[0].values())
    finally:
        torch.set_num_threads(prev)
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize(
    "args,msg",
    [
        (["patches", "--steps", "0"], "--steps"),
        (["patches", "--batch", "-2"], "--batch"),
        (["patches", "--draft-steps", "3"], "--draft-steps"),
        (["digits", "--batch", "3"], "--batch"),
    ],
)
def test_train_cli_refuses_bad_arguments(args, msg, capsys):
    with pytest.raises(SystemExit) as e:
        TR.main(args)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
