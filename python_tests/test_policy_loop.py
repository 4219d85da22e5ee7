"""The pusht policy in closed loop (models/pusht_loop.py, ``specdiff policy``): planners,
episodes, the warm start's plumbing, the command's output and refusals; and the policy's action
chunks, speculative against ancestral DDPM-100, for fixed observation histories (two-sample
tests, with a wrong verifier rejected by the same test)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_pusht import needs_env, needs_weights
from wrong_verifiers import static_wrong_verify

from specdiff_kernels import models
from specdiff_kernels.cli.commands import main, torch_threads
from specdiff_kernels.models import pusht as P
from specdiff_kernels.models import pusht_loop as PL
from specdiff_kernels.sampling.static_round import StaticRound
from specdiff_kernels.testing.two_sample import two_sample_pvalue

ALPHA = 1e-3


def test_shifted_advances_a_chunk_by_the_executed_actions():
    old = torch.arange(2 * 16 * 2, dtype=torch.float32).reshape(2, 16, 2)
    new = PL.shifted(old)
    # the next chunk starts N_ACTION_STEPS later: new[j] is old[j + 8], the tail repeats old[15]
    assert torch.equal(new[:, :8], old[:, 8:])
    assert torch.equal(new[:, 8:], old[:, 15:16].expand(-1, 8, -1))


def test_planner_config_refusals():
    with pytest.raises(ValueError, match="family"):
        PL.PlannerConfig("euler")
    with pytest.raises(ValueError, match="deterministic"):
        PL.PlannerConfig("ddim", 10, "auto")
    with pytest.raises(ValueError, match="warm_start"):
        PL.PlannerConfig("ddpm", 100, None, warm_start=True)
    assert PL.PlannerConfig("ddim", 10, None).label() == "DDIM-10"
    assert "warm start" in PL.PlannerConfig(warm_start=True).label()


@needs_env
@needs_weights
@pytest.mark.parametrize("vectorised", [True, False])
def test_episodes_record_paths_and_planner_calls(vectorised):
    em = models.load("pusht")
    planner = PL.ChunkPlanner(em, PL.PlannerConfig("ddpm", 5, window=4))
    seeds = [100_000, 100_001]
    eps, inputs = PL.run_episodes(
        planner, seeds, vectorised=vectorised, max_steps=20, record_inputs=5
    )
    assert [e.seed for e in eps] == seeds
    for e in eps:
        assert 1 <= e.steps <= 20 and len(e.agent) == len(e.block) == e.steps + 1
        assert 0.0 <= e.coverage <= e.max_coverage <= 1.0
    # 20 steps at 8 actions per chunk: 3 chunks per episode that is not done earlier
    chunks = sum(r.chains for r in planner.records)
    assert chunks == sum(-(-e.steps // P.N_ACTION_STEPS) for e in eps)
    assert len(planner.records) == (3 if vectorised else 6) or not all(e.steps == 20 for e in eps)
    assert len(inputs) == 5 and inputs[0].previous is None and inputs[-1].previous is not None
    s = PL.summarize(eps, planner.records)
    assert s["chunks"] == chunks and s["episodes"] == 2
    assert s["evals_per_chunk"] >= s["calls_per_planner_call"] / 2 > 0


@needs_env
@needs_weights
def test_warm_start_reaches_the_sampler(monkeypatch):
    em = models.load("pusht")
    planner = PL.ChunkPlanner(em, PL.PlannerConfig("ddpm", 10, window=4, warm_start=True))
    seen = []
    real = planner.sampler.sample

    def spy(*args, **kwargs):
        seen.append(kwargs.get("warm_start"))
        return real(*args, **kwargs)

    monkeypatch.setattr(planner.sampler, "sample", spy)
    env = P.make_env()
    o, _ = env.reset(seed=3)
    h = np.stack([o, o])[None]
    first = planner.plan(h)
    planner.plan(h, first)
    assert seen[0] is None and torch.equal(seen[1], PL.shifted(first))


@needs_env
@needs_weights
def test_policy_command_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        ["policy", "--episodes", "2", "--steps", "10", "--latency-chunks", "2", "--out", str(out)]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "success" in text and "calls" in text and "ancestral DDPM-100" in text
    res = json.loads((out / "policy_pusht.json").read_text())
    assert res["config"]["steps"] == 10 and len(res["episodes"]) == 2
    assert set(res["batch1"]) == {"run", "ancestral DDPM-100"}
    assert res["batch1"]["ancestral DDPM-100"]["calls_per_chunk"] == 100
    assert (out / "policy_pusht.png").stat().st_size > 10_000
    # the same folder again: refused without --overwrite, before anything runs
    with pytest.raises(SystemExit) as ex:
        main(["policy", "--episodes", "1", "--out", str(out)])
    assert ex.value.code == 2 and "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,word",
    [
        (["--sampler", "ddim"], "--window"),
        (["--window", "ancestral", "--warm-start"], "--warm-start"),
        (["--steps", "101"], "--steps"),
        (["--window", "0"], "--window"),
        (["--latency-chunks", "-1"], "--latency-chunks"),
        (["--weights", "/nonexistent.safetensors"], "--weights"),
    ],
)
def test_policy_command_refusals_are_one_line(argv, word, capsys, tmp_path):
    with pytest.raises(SystemExit) as ex:
        main(["policy", *argv, "--out", str(tmp_path / "o")])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0]
    assert not (tmp_path / "o").exists()


def test_policy_command_without_the_extra_is_one_line(monkeypatch, capsys, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "gym_pusht", None)
    monkeypatch.setitem(sys.modules, "gym_pusht.envs", None)
    with pytest.raises(SystemExit) as ex:
        main(["policy", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert ex.value.code == 2 and len(err) == 1 and "specdiff_kernels[policy]" in err[0]


# ============================================================== chunks for fixed observations
HISTORY_SEEDS = (100_001, 100_003)
CHAINS = 2000


def histories() -> torch.Tensor:
    """Observation histories [o, o] at the reset of two episodes (the block and agent apart)."""
    env = P.make_env()
    return np.stack([np.stack([o, o]) for o in (env.reset(seed=s)[0] for s in HISTORY_SEEDS)])


def chunks(sampler, em, seed: int, n: int = len(HISTORY_SEEDS)) -> np.ndarray:
    """[n, CHAINS, 32] chunks for the first n histories."""
    cond = em.obs_condition(histories()[:n]).repeat_interleave(CHAINS, 0)
    with torch.inference_mode():
        res = sampler.sample(
            cond.shape[0],
            P.EVENT_SHAPE,
            generator=torch.Generator().manual_seed(seed),
            model_kwargs={"obs": cond},
        )
    return res.samples.reshape(n, CHAINS, -1).numpy()


@pytest.fixture(scope="module")
def ancestral_chunks():
    em = models.load("pusht")
    with torch_threads(2):  # 4,000 chains x 100 calls: the one test here worth two threads
        yield chunks(PL.ChunkPlanner(em, PL.PlannerConfig(window=None)).sampler, em, 1)


def speculative_chunks(seed: int, n: int = len(HISTORY_SEEDS)) -> np.ndarray:
    em = models.load("pusht")
    with torch_threads(2):
        return chunks(PL.ChunkPlanner(em, PL.PlannerConfig(window=8)).sampler, em, seed, n)


@pytest.mark.slow
@needs_env
@needs_weights
def test_speculative_chunks_have_the_ancestral_law(ancestral_chunks):
    spec = speculative_chunks(2)
    for h in range(len(HISTORY_SEEDS)):
        assert two_sample_pvalue(spec[h], ancestral_chunks[h], seed=h) > ALPHA
    # the two histories' chunk laws differ: the test can tell conditionings apart
    assert two_sample_pvalue(spec[0], ancestral_chunks[1]) < ALPHA


@pytest.mark.slow
@needs_env
@needs_weights
def test_policy_chunk_test_rejects_a_wrong_verifier(ancestral_chunks, monkeypatch):
    monkeypatch.setattr(StaticRound, "_verify", static_wrong_verify("always_accept", seed=3))
    spec = speculative_chunks(4, n=1)
    assert two_sample_pvalue(spec[0], ancestral_chunks[0]) < ALPHA
