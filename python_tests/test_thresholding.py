"""diffusers' dynamic thresholding makes the step mean non-affine in x0-hat: the fused round ops
cannot express it, so both samplers must step it by the transitions' own formula, per window
position, and keep the law of the scheduler's own loop."""

from __future__ import annotations

import pytest
import torch
from preamble import SINGLE_THREAD

pytest.importorskip("diffusers")
from diffusers import DDPMScheduler  # noqa: E402
from tiny_diffusers import tiny_unet  # noqa: E402

from specdiff_kernels import AncestralSampler, SpeculativeSampler  # noqa: E402
from specdiff_kernels.integrations.diffusers import DiffusersModel, diffusers_transitions  # noqa: E402
from specdiff_kernels.sampling.transitions import round_tables  # noqa: E402
from specdiff_kernels.testing.two_sample import per_coordinate_ks_pvalue  # noqa: E402

pytestmark = SINGLE_THREAD
STEPS = 12


def scheduler():
    # x0-prediction with a threshold that binds: a random UNet's x0-hat exceeds 1.2 often
    return DDPMScheduler(
        prediction_type="sample",
        thresholding=True,
        sample_max_value=1.2,
        dynamic_thresholding_ratio=0.9,
        clip_sample=False,
    )


class LoudUNet(torch.nn.Module):
    """A random UNet2DModel whose output is scaled up, so that the threshold binds (a random
    UNet's x0-hat rarely leaves [-1, 1])."""

    def __init__(self):
        super().__init__()
        self.net = tiny_unet(3, channels=1, sample_size=4, block_out_channels=(8, 8))

    def forward(self, x, t, return_dict=False):
        return (4.0 * self.net(x, t).sample,)


def unet():
    return LoudUNet()


def scheduler_loop(net, n: int, seed: int) -> torch.Tensor:
    sched = scheduler()
    sched.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(net(x, t)[0], t, x, generator=g).prev_sample
    return x


def test_thresholding_is_not_affine_so_the_static_path_is_refused():
    tr = diffusers_transitions(scheduler(), STEPS)
    assert not tr.affine
    with pytest.raises(ValueError, match="not affine"):
        round_tables(tr)
    with pytest.raises(
        ValueError,
        match=r"^path='static' cannot run with transitions not affine "
        r"in x0-hat \(dynamic thresholding\); use path='ragged'",
    ):
        SpeculativeSampler(DiffusersModel(unet()), tr, window=4, path="static")
    sampler = SpeculativeSampler(DiffusersModel(unet()), tr, window=4)
    assert sampler.resolve_path() == "ragged"
    reason = "transitions not affine in x0-hat (dynamic thresholding)"
    assert sampler.static_path_blockers() == [reason]
    assert reason in " ".join(SpeculativeSampler.__doc__.split())


def test_window_thresholds_each_position_separately():
    """The mean of a window [w, L, *E] equals the means of its positions taken one by one."""
    # a high sample_max_value: the threshold is the quantile itself, which differs by position
    sched = DDPMScheduler(
        prediction_type="sample", thresholding=True, sample_max_value=50.0, clip_sample=False
    )
    tr = diffusers_transitions(sched, STEPS)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 1, 4, 4, generator=g)
    scale = torch.tensor([1.5, 3.0, 6.0, 12.0]).view(1, 4, 1, 1, 1)
    x0 = torch.randn(3, 4, 1, 4, 4, generator=g) * scale
    k = torch.arange(4)[None].expand(3, 4)
    window = tr.mean_from_x0(x, x0, k)
    for j in range(4):
        torch.testing.assert_close(window[:, j], tr.mean_from_x0(x[:, j], x0[:, j], k[:, j]))


@pytest.mark.parametrize(
    "make",
    [
        lambda m, tr: SpeculativeSampler(m, tr, window=4),
        lambda m, tr: AncestralSampler(m, tr),
    ],
    ids=["speculative", "ancestral"],
)
def test_law_matches_the_scheduler_loop(make):
    net = unet()
    n = 1500
    tr = diffusers_transitions(scheduler(), STEPS)
    gen = torch.Generator().manual_seed(6)
    got = make(DiffusersModel(net), tr).sample(n, (1, 4, 4), generator=gen).samples
    ref = scheduler_loop(net, n, seed=5)
    p = per_coordinate_ks_pvalue(got.flatten(1).double().numpy(), ref.flatten(1).double().numpy())
    assert p > 0.01, p
    # power: the same comparison sees the loop without thresholding as different
    plain = DDPMScheduler(prediction_type="sample", clip_sample=False)
    wrong = (
        AncestralSampler(DiffusersModel(net), diffusers_transitions(plain, STEPS))
        .sample(n, (1, 4, 4), generator=torch.Generator().manual_seed(6))
        .samples
    )
    p_wrong = per_coordinate_ks_pvalue(
        wrong.flatten(1).double().numpy(), ref.flatten(1).double().numpy()
    )
    assert p_wrong < 1e-4, p_wrong
