"""The sampler families, one entry each: every consumer reads this table.

A :class:`Family` is what a caller names when it asks for a chain: its canonical name (the
``specdiff sample --scheduler`` value, e.g. ``"euler-a"``) and the other spellings accepted for
it, the native builder in :mod:`specdiff_kernels.sampling.transitions` with the options it takes
on a model's training schedule, the diffusers scheduler class whose step it tabulates (by name:
the sampling layer does not import diffusers) with the settings that make that class this
family, and whether the chain is multistep (its mean takes the previous step's prediction).

Readers: the diffusers adapter (its supported list and dispatch), ``specdiff sample`` and
``specdiff policy`` (choices, help, the scheduler built from a pipeline's config),
``EmbeddedModel.transitions`` and the README's table of supported samplers (checked by
``python_tests/test_families.py``). Adding a family is one entry here plus its builder, and the
adapter's tabulation of its diffusers step if diffusers has one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor

from .edm import (
    cosine_dpmsolver_sde_transitions,
    edm_dpmsolver_sde_transitions,
    edm_euler_churn_transitions,
    euler_churn_transitions,
)
from .transitions import (
    FLOW,
    GaussianTransitions,
    ddim_transitions,
    ddpm_transitions,
    dpmsolver_sde_transitions,
    euler_ancestral_transitions,
    flow_euler_transitions,
    flow_sde_transitions,
)

__all__ = ["FAMILIES", "NAMES", "Family", "canonical", "family", "for_scheduler"]


@dataclass(frozen=True)
class Family:
    """One sampler family. ``scheduler_config``: the settings a diffusers config gets when this
    family is built from another scheduler's config (``specdiff sample --scheduler``);
    ``variant``: those of them that a scheduler of class ``scheduler`` must already have to be
    this family (DPMSolverMultistepScheduler is DPM-Solver++ 2M SDE only with its SDE
    algorithm)."""

    name: str  # canonical: the CLI's spelling
    label: str  # for tables and plots
    description: str  # one line, for help and docs
    builder: Callable[..., GaussianTransitions]
    options: tuple[str, ...]  # the builder's options besides the model's schedule and prediction
    scheduler: Optional[str] = None  # diffusers class name; None: diffusers has no such step
    scheduler_config: tuple[tuple[str, object], ...] = ()
    variant: tuple[str, ...] = ()
    scheduler_note: str = ""  # what else its diffusers step needs, e.g. DDIM's eta > 0
    multistep: bool = False
    clips: bool = False  # the builder takes the model's clip_sample (diffusers' scheduler has it)
    aliases: tuple[str, ...] = ()
    # "vp": built on a discrete training schedule (alphas_cumprod); "flow": on a rectified-flow
    # model (prediction "flow_prediction", x_t = (1 - t) x0 + t eps), which has none
    schedule: str = "vp"

    @property
    def flow(self) -> bool:
        """Whether this is a flow-matching family (no alphas_cumprod)."""
        return self.schedule == "flow"

    @property
    def edm(self) -> bool:
        """Whether the family preconditions an EDM network (``sigma_data``: c_in, c_noise,
        c_skip, c_out); on a VP model it takes the model's own conversion instead."""
        return "sigma_data" in self.options

    @property
    def scheduler_call(self) -> str:
        """The diffusers scheduler as it is constructed, e.g.
        ``DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++')``."""
        cfg = dict(self.scheduler_config)
        return f"{self.scheduler}({', '.join(f'{k}={cfg[k]!r}' for k in self.variant)})"

    @property
    def scheduler_text(self) -> str:
        """The diffusers scheduler with what makes it this family, for messages: e.g.
        ``DDIMScheduler (eta > 0)``; ``"no diffusers scheduler"`` for a family diffusers has
        no step of."""
        if self.scheduler is None:
            return "no diffusers scheduler"
        cfg = dict(self.scheduler_config)
        needs = [f"{k}={cfg[k]!r}" for k in self.variant]
        if self.scheduler_note:
            needs.append(self.scheduler_note)
        return self.scheduler + (f" ({', '.join(needs)})" if needs else "")

    def build(
        self,
        alphas_cumprod: Optional[Tensor],
        num_steps: int,
        *,
        prediction: str,
        clip_sample: Optional[float] = None,
        num_train_timesteps: Optional[int] = None,
        **options,
    ) -> GaussianTransitions:
        """The chain over ``num_steps`` respaced steps of the training schedule
        ``alphas_cumprod`` for a model predicting ``prediction``; ``clip_sample`` is the model's
        clipping, used where the family clips (``clips``); ``options``: among ``options``. A flow
        family takes no schedule (``alphas_cumprod=None``) but a flow_prediction model and its
        ``num_train_timesteps`` (default 1000: it is called with timesteps 1000 t)."""
        for key in options:
            if key not in self.options:
                raise TypeError(
                    f"{self.name} got an unexpected option {key!r}; its options are "
                    f"{', '.join(self.options)}"
                )
        self.check_model(alphas_cumprod is None, prediction)
        if self.flow:
            steps = (
                {} if num_train_timesteps is None else {"num_train_timesteps": num_train_timesteps}
            )
            return self.builder(num_steps, prediction=prediction, **steps, **options)
        model = {"clip_sample": clip_sample} if self.clips else {}
        return self.builder(
            alphas_cumprod=alphas_cumprod,
            num_inference_steps=num_steps,
            prediction=prediction,
            **model,
            **options,
        )

    def check_model(self, no_schedule: bool, prediction) -> None:
        """One line refusing a flow family on a VP model (one with a training schedule or not
        predicting flow_prediction) and a VP family on a flow model."""
        if self.flow and (prediction != FLOW or not no_schedule):
            raise ValueError(
                f"{self.name} is a flow-matching family: it needs a rectified-flow model "
                f"(prediction 'flow_prediction', no alphas_cumprod), got prediction {prediction!r}"
            )
        if not self.flow and (prediction == FLOW or no_schedule):
            raise ValueError(
                f"{self.name} needs a diffusion model with a training schedule (alphas_cumprod); "
                f"a flow-matching model (prediction 'flow_prediction') takes "
                f"{' or '.join(repr(f.name) for f in FAMILIES if f.flow)}"
            )


_RESPACING = ("spacing", "steps_offset")
_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")
_EDM = ("sigma_min", "sigma_max", "sigma_data", "sigma_schedule", "rho")  # EDM's noise levels
_SOLVER = ("solver_order", "solver_type")
_LAST_STEPS = ("lower_order_final", "euler_at_final")

FAMILIES: tuple[Family, ...] = (
    Family(
        "ddpm",
        "DDPM",
        "DDPM's ancestral step (fixed_small or fixed_large variance)",
        ddpm_transitions,
        _RESPACING + ("variance",),
        scheduler="DDPMScheduler",
        clips=True,
    ),
    Family(
        "ddim",
        "DDIM",
        "DDIM with eta > 0 (eta = 1: DDPM's variance on the respaced schedule)",
        ddim_transitions,
        ("eta",) + _RESPACING + ("set_alpha_to_one", "use_clipped_model_output"),
        scheduler="DDIMScheduler",
        scheduler_note="eta > 0",
        clips=True,
    ),
    Family(
        "euler-a",
        "Euler-ancestral",
        "Euler-ancestral (k-diffusion's sampler, VE state convention)",
        euler_ancestral_transitions,
        _RESPACING + ("init_std",),
        scheduler="EulerAncestralDiscreteScheduler",
        aliases=("euler_ancestral",),
    ),
    Family(
        "dpm++2m-sde",
        "DPM++ 2M SDE",
        "DPM-Solver++ 2M SDE (Karras sigmas too), a multistep solver",
        dpmsolver_sde_transitions,
        ("sigma_schedule", "spacing") + _SOLVER + ("final_sigmas_type",) + _LAST_STEPS,
        scheduler="DPMSolverMultistepScheduler",
        scheduler_config=(("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2)),
        variant=("algorithm_type",),
        multistep=True,
    ),
    Family(
        "euler-churn",
        "Euler (churn)",
        "Euler with EDM's churn (s_churn > 0: noise added after the network call), VE state",
        euler_churn_transitions,
        _CHURN + _RESPACING + ("init_std",),
        scheduler="EulerDiscreteScheduler",
        scheduler_note="s_churn > 0",
    ),
    Family(
        "edm-dpm++2m-sde",
        "EDM DPM++ 2M SDE",
        "DPM-Solver++ 2M SDE on EDM's VE state and sigma schedule (EDM preconditioning), multistep",
        edm_dpmsolver_sde_transitions,
        _EDM + _SOLVER + ("final_sigmas_type",) + _LAST_STEPS,
        scheduler="EDMDPMSolverMultistepScheduler",
        scheduler_config=(("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2)),
        variant=("algorithm_type",),
        multistep=True,
    ),
    Family(
        "edm-euler-churn",
        "EDM Euler (churn)",
        "Euler with EDM's churn on EDM's VE state and sigma schedule (EDM preconditioning)",
        edm_euler_churn_transitions,
        _CHURN + _EDM + ("final_sigmas_type",),
        scheduler="EDMEulerScheduler",
        scheduler_note="s_churn > 0",
    ),
    Family(
        "cosine-dpm++2m-sde",
        "Cosine DPM++ 2M SDE",
        "Stable Audio's DPM-Solver++ 2M SDE (EDM preconditioning, atan c_noise, Brownian-tree "
        "noise), multistep",
        cosine_dpmsolver_sde_transitions,
        _EDM + _SOLVER + _LAST_STEPS,
        scheduler="CosineDPMSolverMultistepScheduler",
        scheduler_config=(("solver_order", 2),),
        multistep=True,
    ),
    Family(
        "flow-euler",
        "FlowMatch Euler (stochastic)",
        "rectified flow: FlowMatchEuler's stochastic step x' = (1 - t') x0_hat + t' z",
        flow_euler_transitions,
        ("shift",),
        scheduler="FlowMatchEulerDiscreteScheduler",
        scheduler_config=(("stochastic_sampling", True),),
        variant=("stochastic_sampling",),
        schedule="flow",
    ),
    Family(
        "flow-sde",
        "Flow-GRPO SDE",
        "rectified flow: Flow-GRPO's reverse SDE (noise_level a), Euler-Maruyama",
        flow_sde_transitions,
        ("noise_level", "shift"),
        schedule="flow",
    ),
)

NAMES: tuple[str, ...] = tuple(f.name for f in FAMILIES)
_BY_NAME = {n: f for f in FAMILIES for n in (f.name, *f.aliases)}


def family(name: str, argument: str = "family") -> Family:
    """The family called ``name`` (its canonical name or an alias); ``argument`` names the
    caller's argument in the one-line error for anything else."""
    if isinstance(name, Family):
        return name
    found = _BY_NAME.get(name) if isinstance(name, str) else None
    if found is None:
        aliases = tuple(a for f in FAMILIES for a in f.aliases)
        err = ValueError if isinstance(name, str) else TypeError
        raise err(f"{argument} must be one of {NAMES} (or an alias: {aliases}), got {name!r}")
    return found


def canonical(name: str) -> str:
    """The canonical name of a family name or alias; anything else unchanged (for argparse's
    ``type=``: its ``choices`` then refuses it in its own words)."""
    found = _BY_NAME.get(name) if isinstance(name, str) else None
    return name if found is None else found.name


def for_scheduler(class_name: str) -> Optional[Family]:
    """The family whose diffusers step is the scheduler class ``class_name``, else None."""
    return next((f for f in FAMILIES if f.scheduler == class_name), None)
