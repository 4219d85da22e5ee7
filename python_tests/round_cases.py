"""Shared inputs and oracles for the round-op test suites (CPU, Triton-interpreted, GPU).

The oracle of a round is written here with the samplers' own formulas
(:class:`GaussianTransitions`' ``mean_from_x0`` / ``x0_from_eps`` / ``eps_from_x0``) and the
general verify op's reference (``reference.speculative_verify`` on materialised draft and target
means), in float64: an independent composition, not the table arithmetic of ``round_reference``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from specdiff_kernels import VerifyResult
from specdiff_kernels.ops import layout, round_spec
from specdiff_kernels.ops import round as ro
from specdiff_kernels.ops.reference import round as rr
from specdiff_kernels.ops.reference import verify as reference
from specdiff_kernels.ops.round_spec import RoundChains, RoundSpec
from specdiff_kernels.sampling.langevin import langevin_transitions
from specdiff_kernels.sampling.transitions import (
    GaussianTransitions,
    clip_value,
    ddim_transitions,
    ddpm_transitions,
    dpmsolver_sde_transitions,
    euler_ancestral_transitions,
    flow_euler_transitions,
    flow_sde_transitions,
    round_tables,
)

FAMILIES = {
    "ddpm_eps_clip": lambda: ddpm_transitions(num_inference_steps=40, clip_sample=1.0),
    "ddpm_large_noclip": lambda: ddpm_transitions(num_inference_steps=40, variance="fixed_large"),
    "ddim_eta": lambda: ddim_transitions(num_inference_steps=40, eta=0.7, clip_sample=1.0),
    "ddim_clipped_eps": lambda: ddim_transitions(
        num_inference_steps=40, eta=1.0, clip_sample=0.8, use_clipped_model_output=True
    ),
    "euler_a": lambda: euler_ancestral_transitions(num_inference_steps=40),
    "ula": lambda: langevin_transitions(0.05, 40),
    # rectified flow: state_alpha = 0 at step 0 (t = 1), where the frozen-eps draft's x0 is 0
    "flow_euler": lambda: flow_euler_transitions(40, shift=3.0),
    "flow_sde": lambda: flow_sde_transitions(40),
}


def _dpm2m_test_chain(clip_sample: Optional[float]) -> GaussianTransitions:
    """DPM++ 2M SDE with deterministic steps that carry a multistep term (step 20 mid-schedule and
    the last one): no sampler makes this chain, but the ops take any table, and the real ones' only
    deterministic step (the last) has H = 0, which would leave the H term of the deterministic
    mean untested."""
    T = dpmsolver_sde_transitions(40)
    std, c_prev = T.std.clone(), T.c_prev.clone()
    std[20] = 0.0
    c_prev[-1] = c_prev[-2]
    return GaussianTransitions(
        T.timesteps,
        T.c_x0,
        T.c_x,
        std,
        T.model_alpha,
        T.model_sigma,
        c_prev=c_prev,
        prediction=T.prediction,
        clip_sample=clip_sample,
        name="dpm2m-sde test chain",
    )


# multistep families (the chain carries the previous step's x0-hat: the ops take ``prev``); kept
# apart from FAMILIES, whose cases call the ops without ``prev``
MULTISTEP_FAMILIES = {
    "dpm2m_sde": lambda: dpmsolver_sde_transitions(40),
    "dpm2m_sde_karras": lambda: dpmsolver_sde_transitions(40, sigma_schedule="karras"),
    "dpm2m_sde_heun_leading": lambda: dpmsolver_sde_transitions(
        24, solver_type="heun", spacing="leading", final_sigmas_type="sigma_min"
    ),
    "dpm2m_sde_det": lambda: _dpm2m_test_chain(None),
    "dpm2m_sde_clip_det": lambda: _dpm2m_test_chain(1.0),
}
ALL_FAMILIES = {**FAMILIES, **MULTISTEP_FAMILIES}

# fp32 accumulation for every narrower dtype
ACC_RTOL = {torch.float64: 1e-11, torch.float32: 3e-5, torch.float16: 3e-5, torch.bfloat16: 3e-5}


@dataclass
class RoundCase:
    T: GaussianTransitions
    root: torch.Tensor  # [B, *E] state dtype
    frozen: torch.Tensor  # [B, *E]
    steps: torch.Tensor  # [B] int64
    lengths: torch.Tensor  # [B] int64
    seed: torch.Tensor
    chain_ids: torch.Tensor
    window: int
    freeze: int
    prev: Optional[torch.Tensor] = None  # [B, *E] multistep: the previous step's x0-hat

    @property
    def coef(self) -> torch.Tensor:
        return round_tables(self.T, self.root.device)

    @property
    def clip(self) -> float:
        return clip_value(self.T)

    def to(self, device) -> "RoundCase":
        return RoundCase(
            self.T,
            *(
                t.to(device)
                for t in (
                    self.root,
                    self.frozen,
                    self.steps,
                    self.lengths,
                    self.seed,
                    self.chain_ids,
                )
            ),
            self.window,
            self.freeze,
            None if self.prev is None else self.prev.to(device),
        )

    @property
    def chains(self) -> RoundChains:
        return RoundChains(self.frozen, self.steps, self.lengths, self.chain_ids, self.prev)

    @property
    def spec(self) -> RoundSpec:
        return RoundSpec(self.coef, self.seed, self.freeze, self.clip)

    def draft_args(self) -> tuple:
        """(root, chains, spec, window): the ops' wrappers, the oracle and the Triton launchers."""
        return self.root, self.chains, self.spec, self.window

    def verify_args(self, Y, P) -> tuple:
        """(states, x0_hat, chains, spec)."""
        return Y, P, self.chains, self.spec

    def draft_flat(self) -> tuple:
        """The dispatcher op's flat arguments (torch.ops.specdiff.frozen_draft)."""
        return round_spec.draft_args(*self.draft_args())

    def verify_flat(self, Y, P) -> tuple:
        """torch.ops.specdiff.verify_frozen's flat arguments."""
        return round_spec.verify_args(*self.verify_args(Y, P))


def stochastic_run(T: GaussianTransitions, k: int) -> int:
    """Stochastic steps from step k before the next deterministic one or the end."""
    n = 0
    while k + n < T.num_steps and not bool(T.deterministic[k + n]):
        n += 1
    return n


def make_case(
    B: int,
    L: int,
    event: tuple,
    dtype: torch.dtype,
    family: str,
    freeze: int,
    gen: torch.Generator,
    n_mode: str = "mixed",
) -> RoundCase:
    """Chains at random steps (the last ones included) with windows that stop before a
    deterministic step; ``n_mode="mixed"`` also shortens some windows and sets some to 0. A
    multistep family's case carries ``prev`` (drawn after the one-step case's tensors, so those
    are the same as before)."""
    T = ALL_FAMILIES[family]()
    N = T.num_steps
    k = torch.randint(0, N + 1, (B,), generator=gen)
    k[0] = min(N - 3, int(k[0]))  # keep one chain that can draft
    n = torch.tensor([min(L, stochastic_run(T, int(kk))) if kk < N else 0 for kk in k])
    if n_mode == "mixed":
        cut = torch.randint(0, L + 1, (B,), generator=gen)
        use = torch.rand(B, generator=gen) < 0.3
        n = torch.where(use, torch.minimum(n, cut), n)
    root = (torch.randn((B, *event), generator=gen, dtype=torch.float64) * 0.8).to(dtype)
    frozen = (torch.randn((B, *event), generator=gen, dtype=torch.float64) * 0.6).to(dtype)
    seed = ro.seed_tensor(int(torch.randint(0, 2**62, (1,), generator=gen)))
    ids = torch.randperm(4 * B + 7, generator=gen)[:B].to(torch.int64)
    prev = None
    if family in MULTISTEP_FAMILIES:
        prev = (torch.randn((B, *event), generator=gen, dtype=torch.float64) * 0.6).to(dtype)
    return RoundCase(
        T, root, frozen, k.to(torch.int64), n.to(torch.int64), seed, ids, L, freeze, prev
    )


def make_x0_hat(case: RoundCase, Y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A target x0-hat at the drafted states whose mean gap ||d|| / s is log-uniform in
    [0.1, 4] per position (acceptance from ~0.96 down to ~0.05), in the state dtype."""
    B, L1 = Y.shape[:2]
    D = Y[0, 0].numel()
    f = case.frozen.double().reshape(B, 1, D)
    kk = (case.steps[:, None] + torch.arange(L1)[None]).clamp(max=case.T.num_steps - 1)
    coef = round_tables(case.T)
    scale = (coef[layout.ROW_A] + coef[layout.ROW_E]).abs()[kk] + 1e-3
    s = coef[layout.ROW_STD][kk].clamp_min(1e-3)
    gap = torch.exp(
        torch.empty(B, L1, dtype=torch.float64).uniform_(
            math.log(0.1), math.log(4.0), generator=gen
        )
    )
    eps = (gap * s / (scale * math.sqrt(D)))[..., None]
    if case.freeze == layout.FREEZE_X0:
        base = f
    else:  # the frozen value is an eps: the draft's x0 at y is X0_Y y - X0_F f
        base = (
            coef[layout.ROW_X0_Y][kk][..., None] * Y.reshape(B, L1, D).double()
            - coef[layout.ROW_X0_F][kk][..., None] * f
        )
    P = base + eps * torch.randn((B, L1, D), generator=gen, dtype=torch.float64)
    return P.to(Y.dtype).reshape(Y.shape)


@dataclass
class RoundOracle:
    num_accepted: torch.Tensor
    committed: torch.Tensor
    next_state: torch.Tensor  # float64 [B, D]
    next_frozen: torch.Tensor  # float64 [B, D]
    root_exact: torch.Tensor
    log_ratio: torch.Tensor  # float64 [B, L]
    decisive: torch.Tensor  # [B] position that decides the commit
    margin: torch.Tensor  # [B, L] |log u - log_ratio|
    lr_tol: torch.Tensor  # [B, L] rounding bound of an fp32-accumulated log ratio, per unit
    next_prev: Optional[torch.Tensor] = None  # float64 [B, D] (multistep cases only)


def _coef(T, name, k, like):
    return T.coef(name, k.clamp(0, T.num_steps - 1), like)


def _prev64(case: RoundCase, B: int, D: int) -> Optional[torch.Tensor]:
    return None if case.prev is None else case.prev.cpu().double().reshape(B, D)


def general_draft(case: RoundCase) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft rollout with GaussianTransitions' formulas, in float64: (Y [B, L+1, D], MQ).
    Multistep: the draft's previous prediction is ``prev``, then its own x0-hat a step back."""
    T, B, L = case.T, case.root.shape[0], case.window
    D = case.root[0].numel()
    xi, _ = rr.chain_noise(case.seed, case.chain_ids, case.steps, L, D, torch.float64)
    y = case.root.double().reshape(B, D)
    f = case.frozen.double().reshape(B, D)
    q_prev = _prev64(case, B, D)
    ys, mqs = [y], []
    for j in range(L):
        kj = case.steps + j
        x0q = (
            f
            if case.freeze == layout.FREEZE_X0
            else T.x0_from_eps(ys[-1], f, kj.clamp(max=T.num_steps - 1))
        )
        mq = T.mean_from_x0(ys[-1], x0q, kj.clamp(max=T.num_steps - 1), q_prev)
        q_prev = x0q
        live = (j < case.lengths)[:, None]
        ys.append(torch.where(live, mq + _coef(T, "std", kj, ys[-1]) * xi[:, j], ys[-1]))
        mqs.append(torch.where(live, mq, ys[-2]))
    return torch.stack(ys, 1), torch.stack(mqs, 1)


def general_round(case: RoundCase, Y: torch.Tensor, P: torch.Tensor) -> RoundOracle:
    """The round on the given drafted states Y (state dtype) and x0-hat P, with the samplers'
    formulas and ``reference.speculative_verify`` on materialised means, in float64."""
    T, B, L = case.T, Y.shape[0], case.window
    N = T.num_steps
    D = Y[0, 0].numel()
    Yd, Pd = Y.double().reshape(B, L + 1, D), P.double().reshape(B, L + 1, D)
    f = case.frozen.double().reshape(B, D)
    prev = _prev64(case, B, D)
    k, n = case.steps, case.lengths
    _, u = rr.chain_noise(case.seed, case.chain_ids, k, L, D, torch.float64)
    mq, mp, sig, x0qs = [], [], [], []
    for j in range(L):
        kj = (k + j).clamp(max=N - 1)
        x0q = f if case.freeze == layout.FREEZE_X0 else T.x0_from_eps(Yd[:, j], f, kj)
        # multistep: each chain's previous prediction, prev at the root, then its own x0-hat at
        # the previous drafted state (the draft's, or the target's P_{j-1})
        q_draft = prev if j == 0 or prev is None else x0qs[-1]
        q_target = prev if j == 0 or prev is None else Pd[:, j - 1]
        mq.append(T.mean_from_x0(Yd[:, j], x0q, kj, q_draft))
        mp.append(T.mean_from_x0(Yd[:, j], Pd[:, j], kj, q_target))
        x0qs.append(x0q)
        live = j < n
        sig.append(torch.where(live, T.step_std(kj), torch.ones(B, dtype=torch.float64)))
    MQ, MP, S = torch.stack(mq, 1), torch.stack(mp, 1), torch.stack(sig, 1)
    live = torch.arange(L)[None] < n[:, None]
    MP = torch.where(live[..., None], MP, MQ)
    # the proposal before rounding to the state dtype: m_q + s xi (the stored Y is its rounding)
    xi, _ = rr.chain_noise(case.seed, case.chain_ids, k, L, D, torch.float64)
    prop = MQ + S[..., None] * xi
    lr = reference._log_ratio_acc(prop, MQ, MP, S)
    lr = torch.where(live, lr, torch.zeros_like(lr))
    nv = n.clamp(min=1)
    res = VerifyResult(*reference.speculative_verify(prop, MQ, MP, S, u.double(), nv))
    nacc = torch.where(n > 0, res.num_accepted, torch.zeros_like(n))
    rejected = nacc < n
    pos = torch.where(rejected, nacc, n)
    ar = torch.arange(B)
    kpos = (k + pos).clamp(max=N - 1)
    y_pos, p_pos = Yd[ar, pos], Pd[ar, pos]
    live_next = k + n < N
    det_next = live_next & T.deterministic[(k + n).clamp(max=N - 1)]
    # the target's previous prediction at the deciding position: prev at the root, P_{pos-1} after
    p_before = None
    if prev is not None:
        p_before = torch.where((pos == 0)[:, None], prev, Pd[ar, (pos - 1).clamp(min=0)])
    det_state = T.mean_from_x0(y_pos, p_pos, kpos, p_before)
    state = torch.where(
        rejected[:, None], res.next_state, torch.where(det_next[:, None], det_state, y_pos)
    )
    fz = p_pos if case.freeze == layout.FREEZE_X0 else T.eps_from_x0(y_pos, p_pos, kpos)
    keep = (~rejected & ~live_next) | ((n == 0) & ~det_next)
    next_frozen = torch.where(keep[:, None], f, fz)
    committed = torch.where(rejected, nacc + 1, n + det_next.to(torch.int64))
    root_exact = ~rejected & live_next & ~det_next & (n > 0)
    next_prev = None
    if prev is not None:  # the target's x0-hat at the new state's parent
        next_prev = torch.where((rejected | det_next)[:, None], p_pos, p_before)
    margin = (torch.log(u.double()) - lr).abs()
    # error scale of the log ratio: every term of d (and its x0-hats) rounded relative to itself
    coef = round_tables(T)
    kk = (k[:, None] + torch.arange(L)[None]).clamp(max=N - 1)
    c = coef[:, kk][..., None]  # [8, B, L, 1]
    pq_mag = (
        f.abs()[:, None]
        if case.freeze == layout.FREEZE_X0
        else (c[layout.ROW_X0_Y] * Yd[:, :L]).abs() + (c[layout.ROW_X0_F] * f[:, None]).abs()
    )
    d_mag = (c[layout.ROW_A].abs() + c[layout.ROW_E].abs()) * (Pd[:, :L].abs() + pq_mag)
    if prev is not None and L > 1:  # the multistep term's x0-hats, one position back
        d_mag[:, 1:] += c[layout.ROW_H][:, 1:].abs() * (Pd[:, : L - 1].abs() + pq_mag[:, : L - 1])
    sd = S[..., None]
    d = MP - MQ
    lr_tol = ((d_mag + d.abs()) * (xi.abs() / sd + d.abs() / sd**2)).sum(-1)
    return RoundOracle(
        nacc, committed, state, next_frozen, root_exact, lr, pos, margin, lr_tol, next_prev
    )


def assert_draft_consistent(Y: torch.Tensor, case: RoundCase, dtype: torch.dtype) -> None:
    """Every drafted state is the draft step from the PREVIOUS STORED state (float64 formulas),
    rounded to the state dtype: checked one step at a time, so rounding does not accumulate."""
    B, L1 = Y.shape[:2]
    T = case.T
    D = Y[0, 0].numel()
    Yc = Y.cpu()
    assert Yc.dtype == dtype and Yc.shape == (B, case.window + 1, *case.root.shape[1:])
    assert torch.equal(Yc[:, 0], case.root.cpu()), "Y[:, 0] must be the root, bit for bit"
    xi, _ = rr.chain_noise(
        case.seed.cpu(), case.chain_ids.cpu(), case.steps.cpu(), case.window, D, torch.float64
    )
    f = case.frozen.cpu().double().reshape(B, D)
    Yd = Yc.double().reshape(B, L1, D)
    eps = torch.finfo(dtype).eps
    q_prev = _prev64(case, B, D)  # the draft's previous x0-hat (from the stored state)
    for j in range(case.window):
        kj = (case.steps.cpu() + j).clamp(max=T.num_steps - 1)
        x0q = f if case.freeze == layout.FREEZE_X0 else T.x0_from_eps(Yd[:, j], f, kj)
        mq = T.mean_from_x0(Yd[:, j], x0q, kj, q_prev)
        want = mq + T.coef("std", kj, mq) * xi[:, j]
        live = j < case.lengths.cpu()
        mag = mq.abs() + Yd[:, j].abs() + f.abs() * 4 + xi[:, j].abs() * T.coef("std", kj, mq) + 1
        if q_prev is not None:
            mag = mag + (T.coef("c_prev", kj, mq) * q_prev).abs() * 4
        q_prev = x0q
        tol = eps * want.abs() + 40 * ACC_RTOL[dtype] * mag + torch.finfo(dtype).tiny
        err = (Yd[:, j + 1] - want).abs()
        bad = live[:, None] & (err > tol)
        assert not bool(bad.any()), (
            f"drafted state {j + 1}: {int(bad.sum())} elements off the "
            f"draft step; worst error {float(err[live].max()):.3g}"
        )
        held = ~live
        assert torch.equal(Yc[held, j + 1], Yc[held, j]), "positions past n must repeat the state"


def assert_round_matches(
    got, oracle: RoundOracle, Y: torch.Tensor, P: torch.Tensor, case: RoundCase, dtype: torch.dtype
) -> None:
    """A verify_frozen result against the oracle on the same (rounded) inputs: log ratios within
    accumulation error, decisions equal up to threshold ties, commits, states within rounding."""
    nacc, comm, state, frozen, exact, lr, next_prev = (t.cpu() for t in got)
    B, L = lr.shape
    assert nacc.dtype == torch.int64 and comm.dtype == torch.int64 and exact.dtype == torch.bool
    assert lr.dtype == torch.float32 and state.dtype == dtype and frozen.dtype == dtype
    assert state.shape == case.root.shape and frozen.shape == case.root.shape
    assert next_prev.dtype == dtype
    if case.prev is None:
        assert next_prev.shape == (0,), "next_prev must be an empty [0] tensor without prev"
    else:
        assert next_prev.shape == case.root.shape
    D = state[0].numel()
    live = torch.arange(L)[None] < case.lengths.cpu()[:, None]
    tol = 8 * ACC_RTOL[dtype] * oracle.lr_tol + 2e-7 * oracle.log_ratio.abs() + 1e-30
    lr_err = (lr.double() - oracle.log_ratio).abs()
    ok = (lr_err <= tol) | (~torch.isfinite(oracle.log_ratio) & ~torch.isfinite(lr.double()))
    assert bool(ok[live].all()), (
        f"log ratio off the oracle beyond rounding: worst error {float(lr_err[live].max()):.3g}"
    )
    assert bool((lr[~live] == 0).all()), "log ratios past n must be 0"
    differ = nacc != oracle.num_accepted
    for b in torch.nonzero(differ).flatten().tolist():
        m = int(min(nacc[b], oracle.num_accepted[b]))
        assert oracle.margin[b, m] <= 4 * tol[b, m], (
            f"chain {b}: accepted {int(nacc[b])} vs oracle {int(oracle.num_accepted[b])}, step {m} "
            f"not within rounding of the threshold (margin {float(oracle.margin[b, m]):.3g})"
        )
    same = ~differ
    assert torch.equal(comm[same], oracle.committed[same]), (
        f"committed {comm[same].tolist()} vs oracle {oracle.committed[same].tolist()}"
    )
    assert torch.equal(exact[same], oracle.root_exact[same]), "root_exact differs from the oracle"
    ar = torch.arange(B)
    pos = oracle.decisive
    y_dec = Y.cpu().double().reshape(B, L + 1, D)[ar, pos]
    p_dec = P.cpu().double().reshape(B, L + 1, D)[ar, pos]
    f = case.frozen.cpu().double().reshape(B, D)
    eps = torch.finfo(dtype).eps
    for name, got_v, want in (
        ("next_state", state, oracle.next_state),
        ("next_frozen", frozen, oracle.next_frozen),
    ):
        g = got_v.double().reshape(B, D)
        scale = y_dec.abs() + p_dec.abs() + f.abs() + (want - y_dec).abs() + 1
        tol_v = eps * want.abs() + 100 * ACC_RTOL[dtype] * scale + torch.finfo(dtype).tiny
        err = (g - want).abs()
        bad = same[:, None] & (err > tol_v)
        assert not bool(bad.any()), (
            f"{name} differs from the oracle at {int(bad.sum())} elements; worst error "
            f"{float(err[same].max()):.3g}"
        )
    if case.prev is not None:
        # a copy of an input (prev or a target x0-hat): bit for bit
        want = oracle.next_prev.to(dtype).reshape(next_prev.shape)
        assert torch.equal(next_prev[same], want[same]), (
            f"next_prev differs from the oracle for chains "
            f"{torch.nonzero(same & (next_prev != want).reshape(B, -1).any(1)).flatten().tolist()}"
        )
