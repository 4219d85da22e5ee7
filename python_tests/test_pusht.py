"""The pusht diffusion policy: environment wrapper, normalisation, scripted expert, shipped
weights, schedule (issue 29, items 1-3)."""

import math
import sys

import numpy as np
import pytest
import torch

from specdiff_kernels import models
from specdiff_kernels.models import pusht as P
from specdiff_kernels.sampling.transitions import make_betas

HAS_GYM_PUSHT = True
try:
    P.require_gym_pusht()
except ImportError:
    HAS_GYM_PUSHT = False
needs_env = pytest.mark.skipif(not HAS_GYM_PUSHT, reason="gym-pusht (the [policy] extra)")
# the shipped policy: trained by `python -m specdiff_kernels.models.train pusht --into-package`
needs_weights = pytest.mark.skipif(
    not (P.WEIGHTS_DIR / P.POLICY_FILE).exists(),
    reason="pusht weights not trained yet: python -m specdiff_kernels.models.train pusht "
    "--into-package",
)


def test_cosine_betas_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=P.TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2"
    ).betas.double()
    ours = make_betas("squaredcos_cap_v2", P.TRAIN_TIMESTEPS)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-7)
    assert torch.allclose(P.pusht_betas(), ref, rtol=1e-6, atol=1e-7)


def test_missing_extra_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gym_pusht", None)
    monkeypatch.setitem(sys.modules, "gym_pusht.envs", None)
    with pytest.raises(ImportError) as err:
        P.make_env()
    msg = str(err.value)
    assert "\n" not in msg and "pip install 'specdiff_kernels[policy]'" in msg
    from specdiff_kernels.models.train import main

    with pytest.raises(SystemExit) as ex:
        main(["pusht", "--steps", "1", "--out", "/nonexistent-never-written"])
    assert ex.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "specdiff_kernels[policy]" in lines[0]


def test_normalizer_round_trip():
    rng = np.random.default_rng(0)
    obs = np.concatenate(
        [rng.uniform(0, 512, (500, 4)), rng.uniform(0, 2 * math.pi, (500, 1))], axis=1
    )
    act = rng.uniform(20, 490, (500, 2))
    norm = P.Normalizer.fit(obs, act)
    z = norm.normalize_obs(obs)
    assert z.dtype == torch.float32 and z.shape == (500, 5)
    assert z.min() >= -1 - 1e-5 and z.max() <= 1 + 1e-5
    back = norm.unnormalize_obs(z).double().numpy()
    wrapped = P.wrap_angle(obs)
    assert np.allclose(back, wrapped, atol=1e-3)
    # the wrapped angle is the same angle, in [goal - pi, goal + pi)
    assert np.allclose(np.cos(wrapped[:, 4]), np.cos(obs[:, 4]), atol=1e-9)
    lo = P.GOAL_POSE[2] - math.pi
    assert wrapped[:, 4].min() >= lo and wrapped[:, 4].max() < lo + 2 * math.pi
    za = norm.normalize_action(act)
    assert za.min() >= -1 - 1e-5 and za.max() <= 1 + 1e-5
    assert np.allclose(norm.unnormalize_action(za).numpy(), act, atol=1e-3)
    # torch input gives the same, and the state dict round-trips
    assert torch.allclose(norm.normalize_obs(torch.as_tensor(obs)), z)
    again = P.Normalizer.from_state_dict(norm.state_dict())
    assert torch.equal(again.normalize_obs(obs), z)


def test_training_windows():
    from specdiff_kernels.models.pusht_expert import Episode
    from specdiff_kernels.models.train import pusht_windows

    T = 5
    ep = Episode(
        seed=0,
        obs=np.arange(T * 5, dtype=np.float64).reshape(T, 5),
        actions=np.arange(T * 2, dtype=np.float64).reshape(T, 2),
        success=True,
        coverage=1.0,
    )
    o, a = pusht_windows([ep], P.HORIZON, P.N_OBS_STEPS)
    assert o.shape == (T, 2, 5) and a.shape == (T, P.HORIZON, 2)
    assert torch.equal(o[0, 0], o[0, 1])  # the first observation repeats at t = 0
    assert torch.equal(o[3, 1], torch.as_tensor(ep.obs[3]))
    assert torch.equal(a[3, 1], torch.as_tensor(ep.actions[3]))  # chunk[1] = action at t
    assert torch.equal(a[3, 0], torch.as_tensor(ep.actions[2]))
    assert torch.equal(a[3, -1], torch.as_tensor(ep.actions[-1]))  # the last one repeats


@needs_env
def test_env_wrapper_headless(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    env = P.make_env()
    obs, _ = env.reset(seed=3)
    assert obs.shape == (5,) and obs.dtype == np.float64
    assert 0 <= obs[4] < 2 * math.pi
    obs2, reward, term, trunc, info = env.step(obs[:2])
    assert obs2.shape == (5,) and 0.0 <= info["coverage"] <= 1.0
    assert reward == pytest.approx(min(1.0, info["coverage"] / 0.95))
    assert term == info["is_success"] == (info["coverage"] > 0.95)
    frame = P.render(env)
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3


@needs_env
def test_expert_succeeds_on_fixed_seeds():
    from specdiff_kernels.models.pusht_expert import MAX_STEPS, run_expert_episode

    for seed in (0, 3, 5):
        ep = run_expert_episode(seed)
        assert ep.success and ep.coverage > 0.95, (seed, ep.coverage)
        assert 0 < len(ep.actions) <= MAX_STEPS and ep.obs.shape == (len(ep.actions), 5)
        assert ep.actions.min() >= 0 and ep.actions.max() <= 512
    # deterministic given the seed
    again = run_expert_episode(3)
    assert np.array_equal(again.actions, run_expert_episode(3).actions)


@needs_weights
def test_shipped_policy_loads_and_runs():
    em = models.load("pusht")
    assert em.event_shape == P.EVENT_SHAPE == (16, 2)
    assert em.prediction == "epsilon" and em.clip_sample == 1.0
    assert em.alphas_cumprod.shape == (P.TRAIN_TIMESTEPS,)
    assert sum(p.numel() for p in em.target.parameters()) < 5_000_000
    tr = em.transitions(100)
    assert tr.num_steps == 100
    B = 3
    hist = np.tile(np.array([200.0, 300.0, 256.0, 256.0, 0.5]), (B, 2, 1))
    cond = em.obs_condition(hist)
    assert cond.shape == (B, 10)
    x = torch.randn(B, *em.event_shape)
    out = em.target(x, torch.tensor([99, 50, 0]), obs=cond)
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(TypeError, match="obs="):
        em.target(x, torch.tensor([1, 1, 1]))
    # a short ancestral chain with per-chain conditioning, then the executed actions in pixels
    from specdiff_kernels.sampling.ancestral import AncestralSampler

    res = AncestralSampler(em.target, em.transitions(5)).sample(
        B, em.event_shape, generator=torch.Generator().manual_seed(0), model_kwargs={"obs": cond}
    )
    acts = em.policy.actions(res.samples)
    assert acts.shape == (B, P.N_ACTION_STEPS, 2)
    lo, hi = em.normalizer.action_min.numpy(), em.normalizer.action_max.numpy()
    assert (acts >= lo - 1e-3).all() and (acts <= hi + 1e-3).all()  # clip_sample keeps them in
