"""The round ops (docs/design.md §6) on CPU: counter-based noise, frozen_draft and verify_frozen.

* The noise: Philox4x32-10 against Random123's known-answer vectors; N(0, 1) / U[0, 1) (KS tests);
  no correlation across chains, steps, lanes and Box-Muller pairs; a chain's noise does not depend
  on its batch; the C++ stream equals the reference's (the uniforms bit for bit).
* The ops, ``reference`` and ``cpp`` backends, against an independent oracle
  (``round_cases.general_round``: the samplers' GaussianTransitions formulas and the general
  verify op's reference on materialised means, in float64) over every transition family, both
  freeze modes, clipping on and off, B in {1, 3, 64}, L in {1, 2, 8, 17}, odd event shapes and
  fp16/bf16/fp32/fp64.
* Exactness of one round in law (the reflection coupling), and the same tests failing on a
  deliberately wrong kernel (reflection coefficient 1 - a/b).
* Bad arguments, opcheck, torch.compile(fullgraph=True).
* Multistep chains (``prev``, docs/design.md §6.1): the same oracle comparisons over DPM++ 2M SDE
  families, every commit's next_prev, the H row left unread without prev, the law of a round's
  second step and of the round after (and both tests failing on wrong multistep variants).
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from round_cases import (
    FAMILIES,
    MULTISTEP_FAMILIES,
    assert_draft_consistent,
    assert_round_matches,
    general_draft,
    general_round,
    make_case,
    make_x0_hat,
)
from scipy import stats
from verify_cases import stable_seed
from wrong_verifiers import MULTISTEP_WRONG, multistep_verify_frozen

from specdiff_kernels.ops import layout, round_spec
from specdiff_kernels.ops import round as ro
from specdiff_kernels.ops import verify as ops
from specdiff_kernels.ops.reference import round as rr
from specdiff_kernels.ops.round_spec import RoundChains, RoundSpec
from specdiff_kernels.sampling.transitions import (
    clip_value,
    round_tables,
)

pytestmark = pytest.mark.skipif(not ops.HAS_CPP, reason="the C++ extension is not built")
BACKENDS = ["reference", "cpp"]
SEED = ro.seed_tensor(0x5DEECE66D_1234)


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed(*key))


# ---------------------------------------------------------------- Philox and the noise
KAT = [  # Random123 kat_vectors, philox4x32_10: (counter, key, output)
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers(ctr, key, want):
    out = rr.philox4x32(*(torch.tensor([c]) for c in ctr), *(torch.tensor([k]) for k in key))
    assert [int(o) for o in out] == list(want)


def test_uniforms_are_the_philox_stream_bit_for_bit():
    """u = (x0 >> 8) 2^-24 is exact in fp32: the C++ stream must equal the reference's exactly,
    for chain ids and steps up to the ends of their ranges."""
    ids = torch.tensor([0, 1, 2**31, 2**32 - 1], dtype=torch.int64)
    steps = torch.tensor([-1, 0, 999_999, 123], dtype=torch.int64)
    for seed in (ro.seed_tensor(0), ro.seed_tensor(2**64 - 1), SEED):
        _, u = ro.chain_noise(seed, ids, steps, 5, (3,), backend="cpp")
        _, u_ref = rr.chain_noise(seed, ids, steps, 5, 3, torch.float64)
        assert torch.equal(u, u_ref)
        assert u.dtype == torch.float32 and bool(((u >= 0) & (u < 1)).all())


@pytest.mark.parametrize("D", [1, 3, 5, 37, 4 * 512 + 3, 3 * 32 * 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_normals_match_reference(D, dtype):
    ids = torch.tensor([3, 0, 77], dtype=torch.int64)
    steps = torch.tensor([-1, 5, 41], dtype=torch.int64)
    xi, _ = ro.chain_noise(SEED, ids, steps, 2, (D,), dtype, backend="cpp")
    want, _ = rr.chain_noise(SEED, ids, steps, 2, D, torch.float64)
    assert xi.dtype == dtype and xi.shape == (3, 2, D)
    # fp32 transcendental functions (|xi| <= 5.8): 2e-6 absolute; narrower dtypes: their rounding
    tol = 2e-6 + torch.finfo(dtype).eps * want.abs() if dtype != torch.float64 else 1e-13
    assert bool(((xi.double() - want).abs() <= tol).all()), float((xi.double() - want).abs().max())


def _noise(backend, B=64, window=16, D=257, dtype=torch.float64, seed=SEED):
    ids = torch.arange(B, dtype=torch.int64)
    steps = torch.zeros(B, dtype=torch.int64)
    return ro.chain_noise(seed, ids, steps, window, (D,), dtype, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_marginals(backend):
    """xi ~ N(0, 1) and u ~ U[0, 1) (KS tests on 263k and 16k draws; fixed seeds)."""
    xi, _ = _noise(backend)
    assert stats.kstest(xi.flatten().numpy(), "norm").pvalue > 1e-3
    _, u = _noise(backend, B=1024, window=16, D=1)
    assert stats.kstest(u.flatten().double().numpy(), "uniform").pvalue > 1e-3
    # the tails are there (|xi| > 4 has probability 6.3e-5: ~17 of 263k draws)
    assert int((xi.abs() > 4).sum()) >= 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_independence(backend):
    """No correlation across chains, steps, the four lanes of one Philox block, and no dependence
    between the two normals of a Box-Muller pair (correlation of their squares)."""
    xi, u = _noise(backend, B=64, window=16, D=256)  # Q = 64: lanes e, e+64, e+128, e+192
    pairs = {
        "chains": (xi[:-1], xi[1:]),
        "steps": (xi[:, :-1], xi[:, 1:]),
        "lanes 0/1 (a Box-Muller pair)": (xi[..., :64], xi[..., 64:128]),
        "lanes 1/2 (two pairs)": (xi[..., 64:128], xi[..., 128:192]),
        "squares of a pair": (xi[..., :64] ** 2, xi[..., 64:128] ** 2),
        "elements": (xi[..., :-1], xi[..., 1:]),
    }
    for name, (a, b) in pairs.items():
        r, p = stats.pearsonr(a.flatten().numpy(), b.flatten().numpy())
        assert p > 1e-4, f"{name}: correlation {r:.4f} (p = {p:.2g})"
    r, p = stats.pearsonr(u.flatten().double().numpy(), xi[..., 0].flatten().numpy())
    assert p > 1e-4, f"u vs xi: correlation {r:.4f}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_does_not_depend_on_the_batch(backend):
    """Chain 7's noise at step 12 is the same alone, in a batch, at another row, or read through a
    window that starts earlier; another seed gives other noise."""
    one, u1 = ro.chain_noise(
        SEED, torch.tensor([7]), torch.tensor([12]), 1, (5, 7), backend=backend
    )
    ids = torch.tensor([3, 9, 7, 11], dtype=torch.int64)
    many, um = ro.chain_noise(SEED, ids, torch.tensor([0, 12, 10, 99]), 3, (5, 7), backend=backend)
    assert torch.equal(one[0, 0], many[2, 2]) and torch.equal(u1[0, 0], um[2, 2])
    other, _ = ro.chain_noise(
        ro.seed_tensor(1), torch.tensor([7]), torch.tensor([12]), 1, (5, 7), backend=backend
    )
    assert not torch.equal(one, other)
    assert not torch.equal(many[0, 0], many[1, 0])


# ---------------------------------------------------------------- the round ops vs the oracle
SHAPES = [
    (1, 1, (3,)),
    (3, 2, (5, 7)),
    (3, 8, (37,)),
    (64, 8, (2, 3, 5)),
    (3, 17, (130,)),
    (1, 8, (3, 16, 16)),
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _round_params(families):
    out = []
    for fam in families:
        for freeze in (layout.FREEZE_X0, layout.FREEZE_EPS):
            for i, (B, L, E) in enumerate(SHAPES):
                dtype = DTYPES[(i + freeze + len(fam)) % len(DTYPES)]
                out.append((fam, freeze, B, L, E, dtype))
    return out


ROUND_PARAMS = _round_params(FAMILIES)


def _assert_reference_is_general(case, gen: torch.Generator) -> None:
    """The reference backend's frozen_draft and verify_frozen on ``case`` against the samplers'
    own formulas and the general verify op, float64 throughout."""
    Y = ro.frozen_draft(*case.draft_args(), backend="reference")
    Yg, _ = general_draft(case)
    assert torch.allclose(Y.reshape(Yg.shape), Yg, rtol=1e-12, atol=1e-12)
    P = make_x0_hat(case, Y, gen)
    got = ro.verify_frozen(*case.verify_args(Y, P), backend="reference")
    assert_round_matches(got, general_round(case, Y, P), Y, P, case, torch.float64)


@pytest.mark.parametrize("fam,freeze,B,L,E,dtype", ROUND_PARAMS)
def test_reference_round_equals_general_composition(fam, freeze, B, L, E, dtype):
    """The round_reference formulas (tables A, E, G, ...) against the samplers' own formulas and
    the general verify op, float64 throughout."""
    gen = _gen("ref", fam, freeze, B, L, E)
    case = make_case(B, L, E, torch.float64, fam, freeze, gen)
    _assert_reference_is_general(case, gen)


def _cpp_round(fam, freeze, B, L, E, dtype, key="cpp"):
    """A case (its seed from ``key`` and the parameters), the cpp backend's draft Y on it, the
    target's x0-hat P there, and the cpp verify_frozen's result."""
    gen = _gen(key, fam, freeze, B, L, E, str(dtype))
    case = make_case(B, L, E, dtype, fam, freeze, gen)
    Y = ro.frozen_draft(*case.draft_args(), backend="cpp")
    P = make_x0_hat(case, Y, gen)
    return case, Y, P, ro.verify_frozen(*case.verify_args(Y, P), backend="cpp")


def _check_cpp_round(fam, freeze, B, L, E, dtype, key="cpp"):
    """The cpp backend's frozen_draft and verify_frozen on a case against the oracle."""
    case, Y, P, got = _cpp_round(fam, freeze, B, L, E, dtype, key)
    assert_draft_consistent(Y, case, dtype)
    assert_round_matches(got, general_round(case, Y, P), Y, P, case, dtype)


@pytest.mark.parametrize("fam,freeze,B,L,E,dtype", ROUND_PARAMS)
def test_cpp_round_matches_oracle(fam, freeze, B, L, E, dtype):
    _check_cpp_round(fam, freeze, B, L, E, dtype)


# ---------------------------------------------------------------- every CPU instruction-set variant
# a spread of the cases above: every family, both freeze modes, every shape and dtype
CAPABILITY_PARAMS = ROUND_PARAMS[::5]


@pytest.mark.parametrize("fam,freeze,B,L,E,dtype", CAPABILITY_PARAMS)
def test_cpp_round_matches_oracle_per_capability(cpu_capability, fam, freeze, B, L, E, dtype):
    _check_cpp_round(fam, freeze, B, L, E, dtype)


@pytest.mark.parametrize("D", [3, 4 * 512 + 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normals_match_reference_per_capability(cpu_capability, D, dtype):
    ids = torch.tensor([3, 0, 77], dtype=torch.int64)
    steps = torch.tensor([-1, 5, 41], dtype=torch.int64)
    xi, u = ro.chain_noise(SEED, ids, steps, 2, (D,), dtype, backend="cpp")
    want, u_ref = rr.chain_noise(SEED, ids, steps, 2, D, torch.float64)
    assert torch.equal(u, u_ref)
    tol = 2e-6 + torch.finfo(dtype).eps * want.abs() if dtype != torch.float64 else 1e-13
    assert bool(((xi.double() - want).abs() <= tol).all()), float((xi.double() - want).abs().max())


def test_bad_cpu_capability_is_one_line_error():
    import subprocess
    import sys

    from specdiff_kernels import _C

    with pytest.raises(
        ValueError, match="set_cpu_capability: name must be one of default, avx2, avx512"
    ):
        _C.set_cpu_capability("sse9")
    # the import succeeds (the CLI could not report an import error in one line:
    # arguments/test_ops_arguments.py); the round ops' C++ backend refuses the value at first use
    env = dict(__import__("os").environ, SPECDIFF_CPU_CAPABILITY="avx1024")
    script = (
        "import torch\nfrom specdiff_kernels.ops import round as ro\n"
        "ro.chain_noise(ro.seed_tensor(1), torch.zeros(1, dtype=torch.int64), "
        "torch.zeros(1, dtype=torch.int64), 1, (4,))"
    )
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == (
        "ValueError: SPECDIFF_CPU_CAPABILITY must be one of default, avx2, avx512, got 'avx1024'"
    )


def test_cases_cover_every_commit():
    """The parametrised cases reach rejections, full acceptances, deterministic steps after a
    window, idle chains and chains that finish (else the tests above prove little)."""
    seen = set()
    for params in ROUND_PARAMS:
        case, _, _, res = _cpp_round(*params)
        n, k, N = case.lengths, case.steps, case.T.num_steps
        rej = res.num_accepted < n
        seen |= {"reject"} if bool(rej.any()) else set()
        seen |= {"accept"} if bool(((~rej) & (n > 0) & res.root_exact).any()) else set()
        seen |= {"det"} if bool((res.committed > n).any()) else set()
        seen |= {"idle"} if bool((res.committed == 0).any()) else set()
        seen |= {"finish"} if bool((k + res.committed == N).any()) else set()
    assert seen == {"reject", "accept", "det", "idle", "finish"}, seen


# ---------------------------------------------------------------- exactness in law, power
class _Rejection(NamedTuple):
    """The reference verify's rejecting chains at their first rejected position j (float64
    [B, D]), with the round's chains and spec."""

    rows: torch.Tensor  # the coefficient rows at step k + j
    y: torch.Tensor  # the proposal at j
    p: torch.Tensor  # the target's x0-hat at j
    step: torch.Tensor  # k + j
    frozen: torch.Tensor  # the chains' frozen value
    chains: RoundChains
    spec: RoundSpec


def _reference_but_at_rejections(replace):
    """A verify_frozen that is the reference's, except that a rejecting chain commits
    ``replace(_Rejection)`` (float64 [B, D]) instead of the reflection."""

    def verify(states, x0_hat, chains, spec):
        out = list(rr.verify_frozen(states, x0_hat, chains, spec))
        B, L1 = states.shape[:2]
        D = states[0, 0].numel()
        rejected = out[0] < chains.lengths
        j = torch.where(rejected, out[0], chains.lengths)
        ar = torch.arange(B)
        at = _Rejection(
            rr._rows(spec.coef, chains.steps + j, torch.float64),
            states.reshape(B, L1, D).double()[ar, j],
            x0_hat.reshape(B, L1, D).double()[ar, j],
            chains.steps + j,
            chains.frozen.reshape(B, D).double(),
            chains,
            spec,
        )
        out[2] = (
            torch.where(rejected[:, None], replace(at), out[2].reshape(B, D).double())
            .to(states.dtype)
            .reshape(out[2].shape)
        )
        return tuple(out)

    return verify


@_reference_but_at_rejections
def _wrong_reflection_verify(at: _Rejection) -> torch.Tensor:
    """The reference verify with the reflection coefficient 1 - a/b instead of 1 - 2a/b."""
    c, clip = at.rows, at.spec.clip
    pq = rr.draft_x0(c, at.y, at.frozen, at.spec.freeze)
    d = c[layout.ROW_A] * (rr._clip(at.p, clip) - rr._clip(pq, clip)) + c[layout.ROW_E] * (
        at.p - pq
    )
    D = at.y.shape[1]
    noise = rr.normal_noise(at.spec.seed, at.chains.chain_ids, at.step, D, torch.float64)
    r = c[layout.ROW_STD] * noise
    a = (d * r).sum(-1, keepdim=True)
    b = (d * d).sum(-1, keepdim=True).clamp_min(1e-300)
    return rr.affine_mean(c, pq, at.y, clip) + r + (1 - a / b) * d


def _one_step_law(verify, B=4000, D=3, gap=1.2):
    """B chains at the same root with a frozen x0 that is off the target's: the committed state
    after one step (L = 1) must be N(m_p, s^2 I); returns the KS p-value of its standardised
    projection on the mean gap's direction and the acceptance rate."""
    T = FAMILIES["ddpm_large_noclip"]()  # unclipped: ||m_p - m_q|| = gap * s exactly
    coef = round_tables(T)
    k0 = 30
    s = float(T.std[k0])
    root = torch.full((B, D), 0.3, dtype=torch.float64)
    x0_target = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64)[:D]
    A_E = float(coef[layout.ROW_A, k0] + coef[layout.ROW_E, k0])
    shift = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)[:D]
    frozen = (x0_target - gap * s / A_E * shift / shift.norm()).expand(B, D).contiguous()
    steps = torch.full((B,), k0, dtype=torch.int64)
    ones = torch.ones(B, dtype=torch.int64)
    ids = torch.arange(B, dtype=torch.int64)
    clip = clip_value(T)
    chains = RoundChains(frozen, steps, ones, ids)
    spec = RoundSpec(coef, SEED, layout.FREEZE_X0, clip)
    Y = rr.frozen_draft(root, chains, spec, 1)
    P = x0_target.expand(B, 2, D).contiguous()
    res = verify(Y, P, chains, spec)
    c = rr._rows(coef, steps, torch.float64)
    mp = rr.affine_mean(c, P[:, 0], root, clip)
    mq = rr.affine_mean(c, frozen, root, clip)
    e = (mp - mq)[0] / (mp - mq)[0].norm()
    z = ((res[2] - mp) @ e) / s
    v = torch.zeros(D, dtype=torch.float64)
    v[-1] = 1.0
    v = v - (v @ e) * e
    z_perp = ((res[2] - mp) @ (v / v.norm())) / s  # a direction orthogonal to the gap
    accept = float((res[0] == 1).double().mean())
    return (
        stats.kstest(z.numpy(), "norm").pvalue,
        stats.kstest(z_perp.numpy(), "norm").pvalue,
        accept,
    )


def test_one_round_has_the_target_law():
    p_par, p_perp, accept = _one_step_law(rr.verify_frozen)
    assert 0.3 < accept < 0.8, accept  # both branches of the coupling are exercised
    assert p_par > 1e-3 and p_perp > 1e-3, (p_par, p_perp)


def test_cpp_round_has_the_target_law():
    def cpp(*args):
        return torch.ops.specdiff.verify_frozen(*round_spec.verify_args(*args))

    p_par, p_perp, _ = _one_step_law(cpp)
    assert p_par > 1e-3 and p_perp > 1e-3, (p_par, p_perp)


@_reference_but_at_rejections
def _fresh_from_p_verify(at: _Rejection) -> torch.Tensor:
    """WRONG: at a rejection, a fresh draw from p instead of the reflection."""
    mp = rr.affine_mean(at.rows, at.p, at.y, at.spec.clip)
    return mp + at.rows[layout.ROW_STD] * torch.randn(
        *at.y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )


def test_fresh_draw_at_rejection_is_detected():
    """The residual law (p - q)_+ / TV is not p: drawing afresh from p at a rejection is wrong,
    and the one-step law test sees it."""
    p_par, _, _ = _one_step_law(_fresh_from_p_verify)
    assert p_par < 1e-6, p_par


def test_wrong_reflection_is_detected():
    """The power check: the law test and the oracle comparison both reject a verify whose
    reflection coefficient is 1 - a/b."""
    p_par, _, _ = _one_step_law(_wrong_reflection_verify)
    assert p_par < 1e-6, p_par
    gen = _gen("wrong", 1)
    case = make_case(
        64, 4, (37,), torch.float64, "ddpm_eps_clip", layout.FREEZE_X0, gen, n_mode="full"
    )
    Y = rr.frozen_draft(*case.draft_args())
    P = make_x0_hat(case, Y, gen)
    got = _wrong_reflection_verify(*case.verify_args(Y, P))
    with pytest.raises(AssertionError, match="next_state"):
        assert_round_matches(got, general_round(case, Y, P), Y, P, case, torch.float64)


# ---------------------------------------------------------------- bad arguments, opcheck, compile
def _small_case(dtype=torch.float32):
    return make_case(3, 4, (5,), dtype, "ddpm_eps_clip", layout.FREEZE_X0, _gen("small"))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(seed=3), "seed must be an int64 tensor with one element"),
        (lambda a: a.update(seed=torch.tensor([1.0])), "seed must be an int64"),
        (lambda a: a.update(lengths=torch.tensor([1, 2, 9])), "lengths must lie in 0..window"),
        (lambda a: a.update(steps=torch.tensor([0, 1, 999])), "steps must lie in 0..N"),
        (
            lambda a: a.update(steps=torch.tensor([0, 1, 2], dtype=torch.int32)),
            "steps must be an int64",
        ),
        (
            lambda a: a.update(chain_ids=torch.tensor([0, -1, 2])),
            r"chain_ids must lie in \[0, 2\^32\)",
        ),
        (lambda a: a.update(coef=torch.zeros(8, 5)), "coef must be the float64"),
        (lambda a: a.update(frozen=torch.zeros(3, 6)), "frozen must match"),
        (lambda a: a.update(window=0), "window must be an int >= 1"),
        (lambda a: a.update(freeze=2), "freeze must be 0"),
        (lambda a: a.update(clip=0.0), "clip must be > 0"),
    ],
)
def test_bad_arguments_name_the_argument(mutate, match):
    case = _small_case()
    args = dict(
        root=case.root,
        frozen=case.frozen,
        steps=case.steps,
        lengths=case.lengths,
        coef=case.coef,
        seed=case.seed,
        chain_ids=case.chain_ids,
        window=case.window,
        freeze=case.freeze,
        clip=case.clip,
    )
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=match):
        ro.frozen_draft(*round_spec.draft_parts(**args))


def test_verified_window_must_be_stochastic():
    """A verified window that reaches a deterministic step (std 0: its log ratio would be
    non-finite) is refused; drafting through it is fine (the draft step is the deterministic one)."""
    case = _small_case()
    k = torch.full((3,), 38, dtype=torch.int64)  # step 39 is the deterministic t = 0 step
    n = torch.tensor([2, 2, 1])
    chains = case.chains._replace(steps=k, lengths=n)
    Y = ro.frozen_draft(case.root, chains, case.spec, 4)
    with pytest.raises(ValueError, match=r"lengths\[0\] = 2 from step 38 reaches a deterministic"):
        ro.verify_frozen(Y, Y, chains, case.spec)


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda c: torch.ops.specdiff.frozen_draft(
                c.root, c.frozen, c.steps, c.lengths + 5, c.coef, c.seed, c.chain_ids, 4, 0, 1.0
            ),
            "lengths must lie in",
        ),
        (
            lambda c: torch.ops.specdiff.verify_frozen(
                torch.zeros(3, 5, 5),
                torch.zeros(3, 5, 5),
                c.frozen,
                c.steps * 0 + 38,
                c.lengths * 0 + 2,
                c.coef,
                c.seed,
                c.chain_ids,
                0,
                1.0,
            ),
            "reaches a deterministic step",
        ),
        (
            lambda c: torch.ops.specdiff.verify_frozen(
                *c.verify_flat(torch.zeros(3, 5, 5), torch.zeros(3, 5, 6))
            ),
            "x0_hat must match",
        ),
        (
            lambda c: torch.ops.specdiff.chain_noise(
                c.seed, c.chain_ids, c.steps * 0 - 3, 2, 4, torch.float32
            ),
            "steps must lie in -1..",
        ),
        (
            lambda c: torch.ops.specdiff.chain_noise(
                c.seed.double(), c.chain_ids, c.steps, 2, 4, torch.float32
            ),
            "seed must be an int64",
        ),
    ],
)
def test_cpp_kernels_check_their_arguments(call, match):
    """The C++ kernels refuse bad input themselves (TORCH_CHECK), for callers that bypass the
    Python wrappers."""
    with pytest.raises(RuntimeError, match=match):
        call(_small_case())


def test_opcheck():
    case = _small_case()
    Y = ro.frozen_draft(*case.draft_args())
    P = Y * 0.9 + 0.05
    torch.library.opcheck(
        torch.ops.specdiff.chain_noise.default,
        (case.seed, case.chain_ids, case.steps, 3, 10, torch.float32),
    )
    torch.library.opcheck(torch.ops.specdiff.frozen_draft.default, case.draft_flat())
    torch.library.opcheck(torch.ops.specdiff.verify_frozen.default, case.verify_flat(Y, P))


def test_torch_compile_fullgraph_round():
    """draft -> a network -> verify, compiled as one graph with Inductor: no graph break, and the
    same result as eager."""
    case = _small_case()
    w = torch.linspace(0.5, 1.0, 5)

    def round_(root, frozen, steps, lengths, coef, seed, ids):
        Y = torch.ops.specdiff.frozen_draft(
            root, frozen, steps, lengths, coef, seed, ids, 4, 0, 1.0
        )
        P = torch.tanh(Y * w)
        return torch.ops.specdiff.verify_frozen(
            Y, P, frozen, steps, lengths, coef, seed, ids, 0, 1.0
        )

    args = (case.root, case.frozen, case.steps, case.lengths, case.coef, case.seed, case.chain_ids)
    eager = round_(*args)
    compiled = torch.compile(round_, fullgraph=True, backend="inductor")(*args)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- round statistics
def _stats_case(seed: int, B: int, L: int, N: int, nonfinite: bool):
    g = torch.Generator().manual_seed(seed)
    lay = layout.StatsLayout(L, N, B)
    stats = torch.randint(0, 5, (lay.size,), generator=g)
    stats[layout.STAT_BAD_OUTPUT] = layout.NO_BAD
    stats[layout.STAT_BAD_RATIO] = layout.NO_BAD
    k = torch.randint(0, N + 1, (B,), generator=g)
    n = torch.minimum(torch.randint(0, L + 1, (B,), generator=g), N - k)
    na = (torch.rand(B, generator=g) * (n + 1)).floor().long().clamp(max=n)
    committed = torch.where(n > 0, na + (na < n).long(), (k < N).long())
    lr = torch.randn(B, L, generator=g)
    out = torch.randn(B, L + 1, 3, 2, generator=g)
    if nonfinite:
        lr[torch.rand(B, L, generator=g) < 0.2] = float("nan")
        out[torch.rand(B, L + 1, 3, 2, generator=g) < 0.05] = float("inf")
    return stats, k, n, na, committed, lr, out, N


def test_round_stats_by_hand():
    """Two chains, L = 3, N = 10: chain 0 at step 2 drafts 3 and has 1 accepted (position 1
    rejected, 2 steps committed); chain 1 at step 9 is at a deterministic step (n = 0, 1 committed,
    it finishes). The network output of chain 0 at position 2 is NaN; chain 0's log ratio at
    position 2 (not attempted) is NaN and must be ignored."""
    L, N, B = 3, 10, 2
    lay = layout.StatsLayout(L, N, B)
    stats = torch.zeros(lay.size, dtype=torch.int64)
    stats[layout.STAT_ROUNDS] = 4
    stats[layout.STAT_BAD_OUTPUT] = stats[layout.STAT_BAD_RATIO] = layout.NO_BAD
    out = torch.ones(B, L + 1, 2)
    out[0, 2, 1] = float("nan")
    lr = torch.tensor([[0.1, -3.0, float("nan")], [0.0, 0.0, 0.0]])
    args = (
        stats,
        torch.tensor([2, 9]),
        torch.tensor([3, 0]),
        torch.tensor([1, 0]),
        torch.tensor([2, 1]),
        lr,
        out,
        N,
    )
    for new in (rr.round_stats(*args), ro.round_stats(*args)):
        head = new[: layout.STAT_HEAD].tolist()
        assert head == [5, 1, 2, 1, 0 * (N + 1) + 2 + 2, layout.NO_BAD, 4 + 10, 1]
        assert lay.view(new, "accepted_by_position").tolist() == [1, 0, 0]
        assert lay.view(new, "attempted_by_position").tolist() == [1, 1, 0]
        assert lay.view(new, "accepted_length_hist").tolist() == [0, 1, 0, 0]
        assert lay.view(new, "window_length_hist").tolist() == [0, 0, 0, 1]
        acc = [0] * N
        acc[2] = 1
        att = [0] * N
        att[2] = att[3] = 1
        assert lay.view(new, "accepted_by_step").tolist() == acc
        assert lay.view(new, "attempted_by_step").tolist() == att
        assert lay.view(new, "chain_rounds").tolist() == [0, 5]
    assert int(stats[layout.STAT_ROUNDS]) == 4  # the input is not changed


@pytest.mark.parametrize("seed", range(40))
def test_round_stats_cpp_matches_reference(seed):
    g = torch.Generator().manual_seed(1000 + seed)
    B, L, N = (
        int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 9), (1, 7), (1, 20))
    )
    stats, k, n, na, committed, lr, out, N = _stats_case(seed, B, L, N, nonfinite=seed % 2 == 0)
    dtype = (torch.float32, torch.float16, torch.float64, torch.bfloat16)[seed % 4]
    args = (stats, k, n, na, committed, lr, out.to(dtype), N)
    want = rr.round_stats(*args)
    got = torch.ops.specdiff.round_stats(*args)
    assert torch.equal(got, want)


def test_round_stats_opcheck_and_bad_arguments():
    args = _stats_case(3, 4, 3, 12, nonfinite=True)
    torch.library.opcheck(torch.ops.specdiff.round_stats.default, args)
    stats, k, n, na, committed, lr, out, N = args
    with pytest.raises(ValueError, match="round_stats: stats must be the int64"):
        ro.round_stats(stats[:-1], k, n, na, committed, lr, out, N)
    with pytest.raises(ValueError, match="round_stats: lengths must be an int64"):
        ro.round_stats(stats, k, n.int(), na, committed, lr, out, N)
    with pytest.raises(ValueError, match=r"round_stats: output must have shape \[B, L\+1"):
        ro.round_stats(stats, k, n, na, committed, lr, out[:, :-1], N)
    with pytest.raises(RuntimeError, match="round_stats: stats must be the int64 vector"):
        torch.ops.specdiff.round_stats(stats[:-1], k, n, na, committed, lr, out, N)
    with pytest.raises(RuntimeError, match="num_accepted <= lengths"):
        torch.ops.specdiff.round_stats(stats, k, n, n + 1, committed, lr, out, N)


# ---------------------------------------------------------------- multistep chains (prev)
MS_PARAMS = _round_params(MULTISTEP_FAMILIES)


def test_multistep_params_cover_every_dtype_and_mode():
    for fam in MULTISTEP_FAMILIES:
        seen = {(p[1], p[5]) for p in MS_PARAMS if p[0] == fam}
        assert {d for _, d in seen} == set(DTYPES), fam
        assert {f for f, _ in seen} == {layout.FREEZE_X0, layout.FREEZE_EPS}, fam


@pytest.mark.parametrize("fam,freeze,B,L,E,dtype", MS_PARAMS)
def test_reference_multistep_round_equals_general_composition(fam, freeze, B, L, E, dtype):
    gen = _gen("ms-ref", fam, freeze, B, L, E)
    case = make_case(B, L, E, torch.float64, fam, freeze, gen)
    assert case.prev is not None and case.T.multistep
    _assert_reference_is_general(case, gen)


@pytest.mark.parametrize("fam,freeze,B,L,E,dtype", MS_PARAMS)
def test_cpp_multistep_round_matches_oracle(fam, freeze, B, L, E, dtype):
    _check_cpp_round(fam, freeze, B, L, E, dtype, key="ms-cpp")


@pytest.mark.parametrize("fam,freeze,B,L,E,dtype", MS_PARAMS[::5])
def test_cpp_multistep_round_matches_oracle_per_capability(
    cpu_capability, fam, freeze, B, L, E, dtype
):
    _check_cpp_round(fam, freeze, B, L, E, dtype, key="ms-cpp")


def _commit_kinds(case, res) -> set:
    n, k, N = case.lengths, case.steps, case.T.num_steps
    na, cm = res.num_accepted, res.committed
    kinds = {
        "reject_at_0": (na == 0) & (n > 0),
        "reject_after_0": (na > 0) & (na < n),
        "accept": (na == n) & (n > 0) & (cm == n) & (k + n < N),
        "det_after_window": (n > 0) & (cm == n + 1),
        "det_at_n0": (n == 0) & (cm == 1),
        "idle": (n == 0) & (cm == 0),
    }
    return {name for name, m in kinds.items() if bool(m.any())}


def test_multistep_cases_cover_every_commit():
    """The multistep cases above reach every commit, so their next_prev checks cover each rule:
    P_j at a rejection (at 0 and later), P_{n-1} after a window, P_n at a deterministic step (after
    a window and at n = 0), prev for an idle chain."""
    seen = set()
    for params in MS_PARAMS:
        case, _, _, res = _cpp_round(*params, key="ms-cpp")
        seen |= _commit_kinds(case, res)
    want = {"reject_at_0", "reject_after_0", "accept", "det_after_window", "det_at_n0", "idle"}
    assert seen == want, want - seen


def _hand_commit_case(dtype=torch.float64):
    """One chain per commit, decided by construction (frozen eps, float64): P_j equal to the
    draft's x0-hat (d = 0: accepted) or 3000 away from it (rejected)."""
    T = MULTISTEP_FAMILIES["dpm2m_sde_det"]()  # deterministic steps 20 and 39, with H
    gen = _gen("hand")
    B, L, D = 8, 3, 16
    k = torch.tensor([5, 5, 5, 17, 20, 40, 10, 39])
    n = torch.tensor([3, 3, 3, 3, 0, 0, 0, 0])
    case = make_case(B, L, (D,), dtype, "dpm2m_sde_det", layout.FREEZE_EPS, gen, n_mode="full")
    case.T, case.steps, case.lengths = T, k, n
    return case


@pytest.mark.parametrize("backend", BACKENDS)
def test_multistep_commits_by_hand(backend):
    case = _hand_commit_case()
    B, L1, D = case.root.shape[0], case.window + 1, case.root.shape[1]
    T, coef = case.T, case.coef
    Y = ro.frozen_draft(*case.draft_args(), backend=backend)
    f = case.frozen.double()
    kk = (case.steps[:, None] + torch.arange(L1)[None]).clamp(max=T.num_steps - 1)
    pq = (
        coef[layout.ROW_X0_Y][kk][..., None] * Y.double()
        - coef[layout.ROW_X0_F][kk][..., None] * f[:, None]
    )
    P = pq + 0.3 * torch.randn(B, L1, D, generator=_gen("hand-P"), dtype=torch.float64)
    P[:, : case.window] = pq[:, : case.window]  # every window step accepted ...
    P[1, 0] += 3000.0  # ... but chain 1's step 0
    P[2, 2] += 3000.0  # ... and chain 2's step 2
    got = ro.verify_frozen(*case.verify_args(Y, P), backend=backend)
    assert got.num_accepted.tolist() == [3, 0, 2, 3, 0, 0, 0, 0]
    assert got.committed.tolist() == [3, 1, 3, 4, 1, 0, 0, 1]
    assert got.root_exact.tolist() == [True] + [False] * 7
    want_prev = torch.stack(
        [P[0, 2], P[1, 0], P[2, 2], P[3, 3], P[4, 0], case.prev[5], case.prev[6], P[7, 0]]
    )
    assert torch.equal(got.next_prev, want_prev)
    # deterministic steps: the target's mean with its previous prediction (P_{n-1}, or prev)
    for b, pos, before in ((3, 3, P[3, 2]), (4, 0, case.prev[4]), (7, 0, case.prev[7])):
        kb = case.steps[b : b + 1] + pos
        y = Y[b : b + 1, pos]
        want = T.mean_from_x0(y, P[b : b + 1, pos], kb, before[None])
        assert torch.allclose(got.next_state[b : b + 1], want, rtol=1e-12, atol=1e-12), b
    assert torch.equal(got.next_state[0], Y[0, 3]) and torch.equal(got.next_state[5], Y[5, 0])
    assert_round_matches(got, general_round(case, Y, P), Y, P, case, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_prev_the_h_row_is_not_read(backend):
    """Without prev the ops do not read H (a NaN row changes nothing) and next_prev is an empty
    [0] tensor; the one-step results are those of the one-step table."""
    for fam, dtype in (("ddim_eta", torch.float32), ("dpm2m_sde", torch.bfloat16)):
        gen = _gen("noh", fam)
        case = make_case(3, 4, (5, 3), dtype, fam, layout.FREEZE_EPS, gen)
        case.prev = None
        nan_h = case.coef.clone()
        nan_h[layout.ROW_H] = float("nan")
        Y = ro.frozen_draft(*case.draft_args(), backend=backend)
        nan_spec = case.spec._replace(coef=nan_h)
        got_y = ro.frozen_draft(case.root, case.chains, nan_spec, case.window, backend=backend)
        assert torch.equal(got_y, Y)
        P = make_x0_hat(case, Y, gen)
        want = ro.verify_frozen(*case.verify_args(Y, P), backend=backend)
        got = ro.verify_frozen(Y, P, case.chains, nan_spec, backend=backend)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        assert got.next_prev.shape == (0,) and got.next_prev.dtype == dtype


def test_multistep_with_a_zero_h_row_is_the_one_step_round():
    """prev with H = 0 (a one-step family): the same round as without prev, and next_prev the
    target's x0-hat at the parent."""
    gen = _gen("zero-h")
    case = make_case(5, 3, (7,), torch.float32, "ddpm_eps_clip", layout.FREEZE_X0, gen)
    Y = ro.frozen_draft(*case.draft_args(), backend="cpp")
    P = make_x0_hat(case, Y, gen)
    want = ro.verify_frozen(*case.verify_args(Y, P), backend="cpp")
    prev = torch.randn(case.root.shape, generator=gen)
    with_prev = case.chains._replace(prev=prev)
    Y2 = ro.frozen_draft(case.root, with_prev, case.spec, case.window, backend="cpp")
    assert torch.equal(Y2, Y)
    got = ro.verify_frozen(Y, P, with_prev, case.spec, backend="cpp")
    for a, b in zip(got[:6], want[:6]):
        assert torch.equal(a, b)
    assert got.next_prev.shape == case.root.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multistep_empty_batch(backend, dtype):
    case = make_case(1, 2, (3, 2), dtype, "dpm2m_sde", layout.FREEZE_X0, _gen("b0"))
    for name in ("root", "frozen", "prev"):
        setattr(case, name, getattr(case, name)[:0])
    for name in ("steps", "lengths", "chain_ids"):
        setattr(case, name, getattr(case, name)[:0])
    Y = ro.frozen_draft(*case.draft_args(), backend=backend)
    assert Y.shape == (0, 3, 3, 2)
    got = ro.verify_frozen(*case.verify_args(Y, Y), backend=backend)
    assert got.next_prev.shape == (0, 3, 2) and got.next_prev.dtype == dtype
    assert got.log_ratio.shape == (0, 2)


# exactness in law of the multistep term
def _ms_setup(B, D, k0):
    T = MULTISTEP_FAMILIES["dpm2m_sde"]()  # unclipped
    coef = round_tables(T)
    c = coef[:, k0]
    u_dir = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)[:D]
    u_dir = u_dir / u_dir.norm()
    return T, coef, c, u_dir, torch.arange(B, dtype=torch.int64)


def _mean_p(coef, k, x, p, before, clip=float("inf")):
    c = rr._rows(coef, k, torch.float64)
    return rr.affine_mean(c, p, x, clip) + c[layout.ROW_H] * before


def _law_within_window(draft, verify, B=8000, D=3, k0=34, gap=1.2, shift=1.0):
    """L = 2 from step k0: given step 0 accepted (committed 2), the committed state must be
    N(m_p(y_1, P_1, P_0), s_1^2 I) (step 1's coupling draws fresh noise and uniform). P_0 and prev
    are each ``shift`` std (through H) away from the draft's previous x0-hat along the gap: a mean
    gap without the H term, or a target mean that takes prev instead of P_0, is off by that much.
    Returns the KS p-value of the standardised projection on the gap, the fraction of chains
    that accepted step 0 and the acceptance rate of step 1 among them."""
    T, coef, _, u_dir, ids = _ms_setup(B, D, k0)
    c1 = coef[:, k0 + 1]
    s1, H1 = float(c1[layout.ROW_STD]), float(c1[layout.ROW_H])
    A_E = float(c1[layout.ROW_A] + c1[layout.ROW_E])
    h_step = shift * s1 / abs(H1) * u_dir
    root = torch.full((B, D), 0.3, dtype=torch.float64)
    f = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64)[:D].expand(B, D).contiguous()
    p0 = f + h_step
    prev = (p0 + h_step).contiguous()
    # P_1 such that d_1 = A_E (P_1 - f) + H (P_0 - f) is gap * s_1 along u_dir
    p1 = f + (gap * s1 * u_dir - H1 * h_step) / A_E
    steps = torch.full((B,), k0, dtype=torch.int64)
    n = torch.full((B,), 2, dtype=torch.int64)
    clip = clip_value(T)
    chains = RoundChains(f, steps, n, ids, prev)
    spec = RoundSpec(coef, SEED, layout.FREEZE_X0, clip)
    Y = draft(root, chains, spec, 2)
    P = torch.stack([p0, p1, f], 1).expand(B, 3, D).contiguous()
    res = verify(Y, P, chains, spec)
    took = res[1] == 2  # step 0 accepted
    mp = _mean_p(coef, steps + 1, Y[:, 1], P[:, 1], P[:, 0])
    z = (((res[2] - mp) @ u_dir) / s1)[took]
    accept1 = float((res[0][took] == 2).double().mean())
    return stats.kstest(z.numpy(), "norm").pvalue, float(took.double().mean()), accept1


def _law_next_round(draft, verify, B=4000, D=3, k0=34, gap=1.2, shift=1.0):
    """Two rounds of L = 1: the second round's committed state must be N(m_p(x_1, c_2, c_0), s^2 I)
    with c_0 the target's x0-hat at x_1's parent, P_0 of round 1 (what next_prev must carry).
    c_0 is ``shift`` std (through H) away from round 1's frozen x0 (the draft's x0-hat there) and
    P_1 of round 1 (read for nothing: no deterministic step follows) 3 shifts away."""
    T, coef, _, u_dir, ids = _ms_setup(B, D, k0)
    c2 = coef[:, k0 + 1]
    s, H = float(c2[layout.ROW_STD]), float(c2[layout.ROW_H])
    A_E = float(c2[layout.ROW_A] + c2[layout.ROW_E])
    clip = clip_value(T)
    one = torch.ones(B, dtype=torch.int64)
    root = torch.full((B, D), 0.3, dtype=torch.float64)
    f1 = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64)[:D].expand(B, D).contiguous()
    prev0 = torch.full((B, D), -0.2, dtype=torch.float64)
    h_step = shift * s / abs(H) * u_dir
    c0 = (f1 + h_step).contiguous()
    k = torch.full((B,), k0, dtype=torch.int64)
    spec = RoundSpec(coef, SEED, layout.FREEZE_X0, clip)
    round1 = RoundChains(f1, k, one, ids, prev0)
    Y1 = draft(root, round1, spec, 1)
    P1 = torch.stack([c0, c0 + 3 * h_step], 1).contiguous()
    r1 = verify(Y1, P1, round1, spec)
    x1, prev1 = r1[2], r1[6]
    c_2 = torch.tensor([-0.3, 0.5, 0.1], dtype=torch.float64)[:D].expand(B, D).contiguous()
    f2 = (c_2 - gap * s / A_E * u_dir).contiguous()
    round2 = RoundChains(f2, k + 1, one, ids, prev1)
    Y2 = draft(x1, round2, spec, 1)
    r2 = verify(Y2, torch.stack([c_2, c_2], 1), round2, spec)
    mp = _mean_p(coef, k + 1, x1, c_2, c0)
    z = ((r2[2] - mp) @ u_dir) / s
    return stats.kstest(z.numpy(), "norm").pvalue, float((r1[0] == 1).double().mean())


def _cpp_draft(*args):
    return torch.ops.specdiff.frozen_draft(*round_spec.draft_args(*args))


def _cpp_verify(*args):
    return torch.ops.specdiff.verify_frozen(*round_spec.verify_args(*args))


@pytest.mark.parametrize(
    "draft,verify",
    [
        (rr.frozen_draft, rr.verify_frozen),
        (_cpp_draft, _cpp_verify),
        (rr.frozen_draft, multistep_verify_frozen("correct")),
    ],
    ids=["reference", "cpp", "composed"],
)
def test_multistep_round_has_the_target_law(draft, verify):
    p, took, accept = _law_within_window(draft, verify)
    assert 0.1 < took < 0.9 and 0.2 < accept < 0.8, (took, accept)  # every branch is exercised
    assert p > 1e-3, p
    p, accept = _law_next_round(draft, verify)
    assert 0.1 < accept < 0.9, accept  # round 1: both commits (next_prev P_0 either way)
    assert p > 1e-3, p


@pytest.mark.parametrize("kind", ["target_prev_is_prev", "target_prev_is_draft_x0"])
def test_wrong_multistep_target_prev_is_detected(kind):
    """The power check: a verify whose target takes prev, or the draft's x0-hat (a mean gap
    without the H term), as its previous prediction inside the window fails the law test."""
    p, _, _ = _law_within_window(rr.frozen_draft, multistep_verify_frozen(kind))
    assert p < 1e-6, p


def test_wrong_multistep_next_prev_is_detected():
    """A next_prev that is the draft's x0-hat (not the target's) fails the next round's law."""
    p, _ = _law_next_round(rr.frozen_draft, multistep_verify_frozen("next_prev_is_draft_x0"))
    assert p < 1e-6, p


@pytest.mark.parametrize("kind", ("correct", *MULTISTEP_WRONG))
def test_wrong_multistep_variants_fail_the_oracle(kind):
    """Every wrong multistep variant also fails the oracle comparison (the correct composition
    passes it): the oracle tests above can see these bugs."""
    gen = _gen("ms-wrong", 2)
    case = make_case(64, 4, (37,), torch.float64, "dpm2m_sde", layout.FREEZE_EPS, gen, "full")
    case.steps = torch.randint(20, 33, (64,), generator=gen)  # where H is large
    Y = rr.frozen_draft(*case.draft_args())
    P = make_x0_hat(case, Y, gen)
    got = multistep_verify_frozen(kind)(*case.verify_args(Y, P))
    oracle = general_round(case, Y, P)
    if kind == "correct":
        assert_round_matches(got, oracle, Y, P, case, torch.float64)
    else:
        with pytest.raises(AssertionError):
            assert_round_matches(got, oracle, Y, P, case, torch.float64)


# bad arguments, opcheck, compile with prev
def _small_ms_case(dtype=torch.float32):
    return make_case(3, 4, (5,), dtype, "dpm2m_sde", layout.FREEZE_EPS, _gen("small-ms"))


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda c: c.prev[:, :4], "frozen_draft: prev must match the root states"),
        (lambda c: c.prev.double(), "frozen_draft: prev must match the root states"),
        (lambda c: c.prev[:2], "frozen_draft: prev must match the root states"),
        (lambda c: c.prev.int(), "prev"),
    ],
)
def test_bad_prev_is_refused(bad, match):
    case = _small_ms_case()
    chains = case.chains._replace(prev=bad(case))
    with pytest.raises((ValueError, TypeError), match=match):
        ro.frozen_draft(case.root, chains, case.spec, case.window)
    Y = ro.frozen_draft(*case.draft_args())
    with pytest.raises(
        (ValueError, TypeError), match=match.replace("frozen_draft", "verify_frozen")
    ):
        ro.verify_frozen(Y, Y, chains, case.spec)


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda c: c.prev[:, :4], "prev must match the root states' shape and dtype"),
        (lambda c: c.prev[:2], "prev must match the root states' shape and dtype"),
        (lambda c: c.prev.double(), "prev dtype Double must equal root dtype Float"),
        (lambda c: c.prev.int(), "prev must be a float16, bfloat16, float32 or float64"),
    ],
)
def test_cpp_kernels_check_prev(bad, match):
    case = _small_ms_case()
    args = list(case.draft_flat())
    args[-1] = bad(case)
    with pytest.raises(RuntimeError, match=r"specdiff::frozen_draft: " + match) as info:
        torch.ops.specdiff.frozen_draft(*args)
    assert "\n" not in str(info.value).strip()
    Y = ro.frozen_draft(*case.draft_args())
    vargs = list(case.verify_flat(Y, Y))
    vargs[-1] = bad(case)
    want = match.replace("root dtype", "states dtype")
    with pytest.raises(RuntimeError, match=r"specdiff::verify_frozen: " + want):
        torch.ops.specdiff.verify_frozen(*vargs)


def test_opcheck_multistep():
    case = _small_ms_case()
    Y = ro.frozen_draft(*case.draft_args())
    P = Y * 0.9 + 0.05
    torch.library.opcheck(torch.ops.specdiff.frozen_draft.default, case.draft_flat())
    torch.library.opcheck(torch.ops.specdiff.verify_frozen.default, case.verify_flat(Y, P))


def test_torch_compile_fullgraph_multistep_round():
    case = _small_ms_case()
    w = torch.linspace(0.5, 1.0, 5)

    def round_(root, frozen, steps, lengths, coef, seed, ids, prev):
        Y = torch.ops.specdiff.frozen_draft(
            root, frozen, steps, lengths, coef, seed, ids, 4, 1, 1.0, prev
        )
        P = torch.tanh(Y * w)
        return torch.ops.specdiff.verify_frozen(
            Y, P, frozen, steps, lengths, coef, seed, ids, 1, 1.0, prev
        )

    args = (
        case.root,
        case.frozen,
        case.steps,
        case.lengths,
        case.coef,
        case.seed,
        case.chain_ids,
        case.prev,
    )
    eager = round_(*args)
    assert len(eager) == 7 and eager[6].shape == case.root.shape
    compiled = torch.compile(round_, fullgraph=True, backend="inductor")(*args)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_cpp_multistep_round_does_not_depend_on_the_thread_count():
    """Chunk sizes, not the thread count, split the work: 1 and 2 threads give the same bits
    (events of several chunks, so a chain's sums gather partials from different threads)."""
    gen = _gen("threads")
    case = make_case(5, 4, (4 * 512 * 3 + 5,), torch.float32, "dpm2m_sde", 1, gen, "full")
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            Y = ro.frozen_draft(*case.draft_args(), backend="cpp")
            P = make_x0_hat(case, Y, _gen("threads-P"))
            outs.append((Y, *ro.verify_frozen(*case.verify_args(Y, P), backend="cpp")))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- the round spec and the schemas
@pytest.mark.parametrize("op", ["frozen_draft", "verify_frozen"])
def test_round_spec_flattens_to_the_dispatcher_schema(op):
    """SCHEMAS is what csrc/registration.cpp defines; the bundles' fields are named as the
    schema's arguments, and flatten / unflatten put each in its schema position."""
    schema = getattr(torch.ops.specdiff, op).default._schema
    assert str(schema) == f"specdiff::{op}{round_spec.SCHEMAS[op]}"
    names = [a.name for a in schema.arguments]
    parts = {"frozen_draft": round_spec.draft_parts, "verify_frozen": round_spec.verify_parts}[op]
    flatten = {"frozen_draft": round_spec.draft_args, "verify_frozen": round_spec.verify_args}[op]
    stand_ins = [1.5 if n == "clip" else n for n in names]  # flatten makes clip a float
    bundled = parts(*stand_ins)
    chains, spec = (b for b in bundled if isinstance(b, (RoundChains, RoundSpec)))
    assert chains._asdict() == {f: f for f in RoundChains._fields}
    assert {**spec._asdict(), "clip": "clip"} == {f: f for f in RoundSpec._fields}
    assert list(flatten(*bundled)) == stand_ins


def test_round_ops_refuse_flat_arguments_in_one_line():
    """The wrappers take the bundles; the old flat call is refused naming the argument."""
    case = _small_case()
    with pytest.raises(TypeError, match=r"^frozen_draft: chains must be a RoundChains"):
        ro.frozen_draft(case.root, case.frozen, case.spec, case.window)
    with pytest.raises(TypeError, match=r"^verify_frozen: spec must be a RoundSpec"):
        ro.verify_frozen(case.root[:, None].expand(3, 2, 5), case.root, case.chains, case.coef)
