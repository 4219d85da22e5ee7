"""``specdiff sample``: speculative sampling of a diffusers pipeline folder or an embedded model.

Two halves, so that every argument is refused before any weight is read:

* :func:`resolve_pipeline` reads only JSON (``model_index.json``, ``scheduler/scheduler_config.json``,
  ``unet/config.json``) and builds the chain's transitions from the scheduler's config (no weights),
  so the adapter's own refusals (learned variances, DDIM with eta = 0, deterministic solvers, ...)
  surface as one-line argument errors in :mod:`specdiff_kernels.cli.commands`;
* :func:`run_sample` loads the network, samples, writes ``samples.png`` and ``stats.json``, and with
  ``compare`` also runs the ancestral chain (independent seed) for the cost table and the
  two-sample p-value.

The JSON checks cover the weights too, as far as a header tells: the UNet's safetensors file must
be complete (its header's offsets within the file) and every tensor it holds must have the shape
the UNet config gives (the model built on the meta device: no memory, no weights read).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..sampling.families import NAMES, Family, canonical, family, for_scheduler
from ..sampling.network import CastNet

# --scheduler takes a sampler family (sampling.families); a deterministic solver's stochastic
# counterpart, suggested when a pipeline's own scheduler is one
SDE = family("dpm++2m-sde")
# the families a VP pipeline folder (a beta schedule) can take: not the flow-matching ones, nor
# an EDM one (it preconditions an EDM network)
VP_NAMES = tuple(n for n in NAMES if not family(n).flow and not family(n).edm)
# the family option each flag sets, and so the families it applies to
FLAG_OPTIONS = {"--eta": "eta", "--karras": "sigma_schedule"}
# --karras sets use_karras_sigmas on the scheduler config, replacing these
OTHER_SIGMAS = ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")
EMBEDDED = ("patches", "digits", "digits-flow")
# the embedded MLPs sampled without a diffusers pipeline (models.load)
MLPS = ("digits", "digits-flow")
# UNets called as unet(sample, timestep): conditional ones need inputs this command has no flag for
UNET_CLASSES = ("UNet2DModel",)
DEFAULT_ETA = 1.0  # DDIM: eta = 1 is DDPM's posterior variance on the respaced schedule
INDEPENDENT_SEED_OFFSET = 10_007  # the --compare ancestral run's seed: seed + this (as the demo)


class PipelineError(ValueError):
    """A pipeline that cannot be sampled; ``option`` is the flag the message asks to change."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


@dataclass
class PipelineSpec:
    """What the checks learned about ``--pipeline`` without loading any weights."""

    name: str  # "digits", "digits-flow", "patches" or the folder as given
    path: Optional[Path]  # the save_pretrained folder (None: an embedded MLP, MLPS)
    scheduler: str  # a sampler family's name (sampling.families)
    own_scheduler: str  # the pipeline's own scheduler class name
    event_shape: tuple
    max_steps: int  # training timesteps: the most sampling steps
    has_draft_model: bool
    transitions: object = field(default=None, repr=False)
    unet_class: Optional[str] = None
    act_bytes: int = 0  # estimated activation bytes per state of one network call (cli.memory)
    karras: bool = False  # dpm++2m-sde on Karras sigmas

    @property
    def scheduler_label(self) -> str:
        return self.scheduler + (" (Karras sigmas)" if self.karras else "")


def _read_json(path: Path, option: str, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(option, f"{what}: no {path.name} in {str(path.parent)!r}") from None
    except (OSError, ValueError) as err:
        raise PipelineError(option, f"{what}: cannot read {str(path)!r}: {err}") from None


def patches_dir() -> Path:
    """The embedded ``patches`` pipeline's save_pretrained folder."""
    try:
        from ..models import patches
    except ImportError as err:
        raise PipelineError(
            "--pipeline",
            f"the embedded 'patches' model is not in this install "
            f"({err}); pass a pipeline folder or 'digits'",
        ) from None
    folder = Path(patches.pipeline_dir())
    if not (folder / "model_index.json").is_file():
        how = getattr(
            patches,
            "TRAIN_COMMAND",
            "python -m specdiff_kernels.models.train patches --into-package",
        )
        raise PipelineError(
            "--pipeline",
            f"the embedded 'patches' pipeline is not in this install "
            f"(no model_index.json in {str(folder)!r}); train it with "
            f"`{how}`, or pass a pipeline folder or 'digits'",
        )
    return folder


def _check_transformer(path: Path, index: dict) -> None:
    """A folder whose denoiser is a ``transformer/`` (DiT, PixArt, SD3, ...), not a ``unet/``."""
    if (path / "unet" / "config.json").is_file():
        return
    folder = path / "transformer"
    if not ((folder / "config.json").is_file() or "transformer" in index):
        return
    try:
        cls = json.loads((folder / "config.json").read_text()).get("_class_name", "?")
    except (OSError, ValueError, AttributeError):
        cls = "?"
    if cls == "?" and isinstance(index.get("transformer"), list) and index["transformer"]:
        cls = index["transformer"][-1]
    raise PipelineError(
        "--pipeline",
        f"{str(path)!r}: its denoiser is a transformer ({cls} in transformer/), not a unet; "
        f"transformer models are not supported yet (specdiff sample runs unconditional "
        f"{', '.join(UNET_CLASSES)} pipelines)",
    )


def _check_flow(pipeline: str, path: Path) -> None:
    """A flow-matching scheduler config is refused first, whatever --scheduler says: no supported
    sampler has its schedule (following a suggested --scheduler would sample the flow model on
    a default VP schedule)."""
    from ..integrations.diffusers import is_flow_matching

    try:
        cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return  # missing or unreadable: refused with its own message later
    if not isinstance(cfg, dict):
        return
    own = cfg.get("_class_name", "?")
    why = is_flow_matching(own, cfg)
    if why is not None:
        raise PipelineError(
            "--pipeline",
            f"{pipeline!r}: a flow-matching pipeline (scheduler {own}: {why}); flow-matching "
            f"models are not supported yet by specdiff sample ({_all_families()} sample "
            f"diffusion models trained on a beta schedule; flow models take the flow-euler and "
            f"flow-sde chains in Python, docs/usage.md)",
        )


def _check_unet(path: Path) -> tuple[str, tuple, dict]:
    cfg = _read_json(
        path / "unet" / "config.json", "--pipeline", f"{str(path)!r} has no usable unet/"
    )
    if not isinstance(cfg, dict):
        raise PipelineError("--pipeline", f"{str(path)!r}: unet/config.json is not a JSON object")
    cls = cfg.get("_class_name", "?")
    if cls not in UNET_CLASSES:
        raise PipelineError(
            "--pipeline",
            f"{str(path)!r}: its unet is a {cls}; specdiff sample "
            f"runs unconditional {', '.join(UNET_CLASSES)} pipelines",
        )
    try:
        cin, cout = int(cfg.get("in_channels", 3)), int(cfg.get("out_channels", 3))
        size = cfg.get("sample_size", 32)
        h, w = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
        if min(cin, cout, h, w) < 1:
            raise ValueError("in_channels, out_channels and sample_size must be positive")
    except (TypeError, ValueError) as err:
        raise PipelineError(
            "--pipeline",
            f"{str(path)!r}: unet/config.json: in_channels, out_channels or sample_size is not "
            f"usable ({err})",
        ) from None
    if cout != cin:
        raise PipelineError(
            "--pipeline",
            f"{str(path)!r}: its unet has out_channels {cout} for "
            f"in_channels {cin} (a learned variance?); speculative "
            f"sampling needs a UNet that predicts only the noise/x0/v, "
            f"with fixed variances",
        )
    return cls, (cin, int(h), int(w)), cfg


WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"}


def _safetensors_header(path: Path) -> dict:
    """The header of a safetensors file, checked against the file's size (a truncated or
    corrupt file is refused here, not in three chained tracebacks from the loader)."""
    where = f"{str(path)!r}"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if n < 2 or 8 + n > size:
                raise ValueError("its header length does not fit the file")
            header = json.loads(f.read(n))
        end = 0
        for name, t in header.items():
            if name == "__metadata__":
                continue
            begin, stop = t["data_offsets"]
            if t["dtype"] not in SAFETENSORS_DTYPES or not 0 <= begin <= stop:
                raise ValueError(f"tensor {name!r} has a bad entry")
            end = max(end, int(stop))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PipelineError(
            "--pipeline", f"{where} is not a readable safetensors file ({err})"
        ) from None
    if 8 + n + end > size:
        raise PipelineError(
            "--pipeline",
            f"{where} is truncated: {size} bytes, its safetensors header needs {8 + n + end}",
        )
    return header


def _check_unet_weights(path: Path, cls_name: str, cfg: dict) -> None:
    """The UNet's weights exist and, for safetensors, are complete and have the shapes its config
    gives."""
    folder = path / "unet"
    found = [folder / n for n in WEIGHT_NAMES if (folder / n).is_file()]
    sharded = any(folder.glob("*.index.json"))
    if not found and not sharded:
        raise PipelineError(
            "--pipeline", f"{str(path)!r}: no weights in unet/ (expected {WEIGHT_NAMES[0]})"
        )
    if not found or found[0].suffix != ".safetensors":
        return  # sharded or pickled weights: only loading can tell
    header = _safetensors_header(found[0])
    import diffusers

    try:
        with torch.device("meta"):
            expected = {
                k: tuple(v.shape)
                for k, v in getattr(diffusers, cls_name)
                .from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
                .state_dict()
                .items()
            }
    except Exception as err:  # diffusers raises many kinds for a config it cannot build
        raise PipelineError(
            "--pipeline",
            f"{str(path)!r}: unet/config.json does not build a {cls_name}: "
            f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}",
        ) from None
    stored = {k: tuple(t["shape"]) for k, t in header.items() if k != "__metadata__"}
    wrong = [k for k in expected if k in stored and stored[k] != expected[k]]
    missing = [k for k in expected if k not in stored]
    if wrong or missing:
        k = (wrong or missing)[0]
        what = f"{k} has shape {stored[k]}, the config gives {expected[k]}" if wrong else f"no {k}"
        raise PipelineError(
            "--pipeline",
            f"{str(path)!r}: the unet weights do not match unet/config.json "
            f"({len(wrong)} tensors of another shape, {len(missing)} missing; first: {what})",
        )


def _all_families() -> str:
    return f"{', '.join(VP_NAMES[:-1])} and {VP_NAMES[-1]}"


def _chain_scheduler(fam: Family, given: bool, config: dict, overrides: dict):
    """The chain's diffusers scheduler from the folder's config: a --scheduler given makes any
    config the family's (its scheduler settings over the config's, e.g. DPM-Solver++'s ODE one
    the 2M SDE one); the pipeline's own is taken as it is. The step's options are checked when
    it is tabulated."""
    from ..integrations.diffusers import build_scheduler

    try:
        return build_scheduler({**config, **overrides}, fam.name if given else fam.scheduler)
    except (TypeError, ValueError) as err:
        raise PipelineError("--pipeline", f"scheduler/scheduler_config.json: {err}") from None


def _config_value(cls_name: str, cfg: dict, key: str):
    """``cfg[key]``, else the scheduler class's default for it."""
    import inspect

    import diffusers

    if key in cfg:
        return cfg[key]
    param = inspect.signature(getattr(diffusers, cls_name).__init__).parameters.get(key)
    return None if param is None else param.default


def _own_scheduler(own: str, cfg: dict) -> str:
    """The --scheduler name of the pipeline's own scheduler, else a PipelineError saying why."""
    from ..integrations.diffusers import DETERMINISTIC_SCHEDULERS, NO_NOISE, UNSUPPORTED_REASONS

    fam = for_scheduler(own)
    if fam is not None:
        settings = dict(fam.scheduler_config)
        for key in fam.variant:  # e.g. DPMSolverMultistepScheduler's algorithm_type
            value = _config_value(own, cfg, key)
            if value != settings[key]:
                raise PipelineError(
                    "--scheduler",
                    f"the pipeline's own scheduler {own} ({key} {value!r}) is {NO_NOISE}; pass "
                    f"--scheduler {fam.name} (its SDE variant)",
                )
        return fam.name
    if own in DETERMINISTIC_SCHEDULERS:
        others = ", ".join(n for n in VP_NAMES if n != SDE.name)
        raise PipelineError(
            "--scheduler",
            f"the pipeline's own scheduler {own} is {NO_NOISE}; pass --scheduler {SDE.name} "
            f"(or {others})",
        )
    reason = UNSUPPORTED_REASONS.get(own, "no Gaussian ancestral step to speculate")
    raise PipelineError(
        "--scheduler",
        f"the pipeline's own scheduler {own} is not supported ({reason}); pass "
        f"--scheduler {' or '.join(VP_NAMES)} (on the same training schedule)",
    )


# the scheduler-config keys that define the training schedule: a --scheduler override builds
# from the folder's config, so it inherits them where its class has them
TRAINING_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
    "snr_shift_scale",
)
BETA_KEYS = ("beta_schedule", "trained_betas", "beta_start", "beta_end")


def _own_training_schedule(pipeline: str, own: str, cfg: dict):
    """The pipeline's own scheduler built from its config (JSON only), to compare an override's
    training schedule with; a scheduler without a discrete beta (VP) schedule, or whose model
    takes continuous timesteps, is refused whatever --scheduler says (every supported sampler
    would run its model on another schedule). None: nothing to compare with (an unbuildable
    config is refused with its own message when the chain's scheduler is built)."""
    import diffusers

    from ..integrations.diffusers import (
        DETERMINISTIC_SCHEDULERS,
        NO_NOISE,
        UNSUPPORTED_REASONS,
        quiet_diffusers,
    )

    where = f"{pipeline!r}: its scheduler {own}"
    cls = getattr(diffusers, own, None) if isinstance(own, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        if any(k in cfg for k in BETA_KEYS):
            return None  # an unknown class that names its beta schedule: the override inherits it
        raise PipelineError(
            "--pipeline",
            f"{where} is not a scheduler this diffusers knows and its config names no beta "
            f"schedule ({', '.join(BETA_KEYS)}), so its training schedule is unknown and no "
            f"supported sampler can be matched to it",
        )
    try:
        import warnings

        with warnings.catch_warnings(), quiet_diffusers():
            warnings.simplefilter("ignore")
            built = cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    except Exception:  # diffusers raises many kinds for a bad config: reported when built again
        return None
    if getattr(built, "alphas_cumprod", None) is None:
        fam = for_scheduler(own)
        if fam is not None and fam.edm:
            reason = f"an EDM sampler ({fam.name}) for an EDM-preconditioned network"
        else:
            reason = UNSUPPORTED_REASONS.get(own) or (
                NO_NOISE if own in DETERMINISTIC_SCHEDULERS else "no beta schedule"
            )
        raise PipelineError(
            "--pipeline",
            f"{where} has no discrete beta (VP) training schedule ({reason}); its model is not "
            f"supported yet: {_all_families()} would run it on another schedule",
        )
    if built.config.get("timestep_type", "discrete") == "continuous":
        raise PipelineError(
            "--pipeline",
            f"{where} has timestep_type 'continuous' (its model is conditioned on "
            f"0.25 log(sigma), not on a timestep index); no supported sampler calls a model that "
            f"way, so it is not supported yet",
        )
    return built


def _check_inherited(name: str, own: str, own_sched, sched) -> None:
    """The chain's scheduler (built from the folder's config) has the training schedule and
    prediction type of the pipeline's own: what its class cannot take is refused. (The tolerance
    lets Euler's clamp of a zero terminal alpha-bar to 2**-24 pass.)"""
    a, b = own_sched.alphas_cumprod.double(), sched.alphas_cumprod.double()
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
        import inspect

        # from_config keeps keys its class does not take in the config: ask its signature
        takes = inspect.signature(type(sched).__init__).parameters
        lost = [
            f"{k}={own_sched.config[k]!r}"
            for k in TRAINING_KEYS
            if k in own_sched.config
            and (k not in takes or sched.config.get(k) != own_sched.config[k])
        ]
        what = (
            f" ({', '.join(lost)} of {own} is not a {type(sched).__name__} setting)" if lost else ""
        )
        raise PipelineError(
            "--scheduler",
            f"{name}: its training schedule (alphas_cumprod) would differ from the pipeline's own "
            f"{own}'s{what}; the model must be sampled on the schedule it was trained on",
        )
    want = own_sched.config.get("prediction_type", "epsilon")
    got = sched.config.get("prediction_type", "epsilon")
    if want != got:
        raise PipelineError(
            "--scheduler",
            f"{name}: its prediction_type {got!r} would differ from the pipeline's own {own}'s "
            f"{want!r} (the model predicts {want})",
        )


def _check_flag(flag: str, scheduler: str, own: Optional[str] = None) -> None:
    """``flag`` (given) sets an option of the family ``scheduler`` (FLAG_OPTIONS)."""
    option = FLAG_OPTIONS[flag]
    if option not in family(scheduler).options:
        takes = " or ".join(f.name for f in map(family, NAMES) if option in f.options)
        raise PipelineError(
            flag,
            f"applies to --scheduler {takes} only"
            + ("" if own is None else f" (this pipeline's own scheduler is {own})"),
        )


def _check_flags(scheduler: str, eta, karras: bool, own: Optional[str] = None) -> None:
    if eta is not None:
        _check_flag("--eta", scheduler, own)
    if karras:
        _check_flag("--karras", scheduler, own)


def resolve_pipeline(
    pipeline: str,
    scheduler: Optional[str],
    steps: int,
    eta: Optional[float],
    karras: bool = False,
) -> PipelineSpec:
    """Check ``--pipeline`` / ``--scheduler`` / ``--eta`` / ``--karras`` / ``--steps`` from JSON
    only; build the transitions (cheap: tables from the scheduler config). Raises
    :class:`PipelineError`."""
    scheduler = None if scheduler is None else canonical(scheduler)
    if pipeline in MLPS:
        return _resolve_digits(pipeline, scheduler, steps, eta, karras)
    path = patches_dir() if pipeline == "patches" else Path(pipeline)
    if not path.exists():
        raise PipelineError(
            "--pipeline",
            f"{pipeline!r} does not exist (a diffusers save_pretrained "
            f"folder, or one of {', '.join(EMBEDDED)})",
        )
    if not path.is_dir():
        raise PipelineError(
            "--pipeline",
            f"{pipeline!r} is not a directory (a diffusers "
            f"save_pretrained folder, or one of {', '.join(EMBEDDED)})",
        )
    index = _read_json(
        path / "model_index.json", "--pipeline", f"{pipeline!r} is not a diffusers pipeline folder"
    )
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise PipelineError(
            "--pipeline", "diffusers is not installed (pip install 'specdiff_kernels[diffusers]')"
        ) from None
    _check_flow(pipeline, path)
    _check_transformer(path, index if isinstance(index, dict) else {})
    unet_class, event_shape, unet_cfg = _check_unet(path)
    _check_unet_weights(path, unet_class, unet_cfg)
    sched_cfg = _read_json(
        path / "scheduler" / "scheduler_config.json",
        "--pipeline",
        f"{pipeline!r} has no usable scheduler/",
    )
    if not isinstance(sched_cfg, dict):
        raise PipelineError(
            "--pipeline", f"{pipeline!r}: scheduler/scheduler_config.json is not a JSON object"
        )
    own = sched_cfg.get("_class_name", "?")
    own_sched = _own_training_schedule(pipeline, own, sched_cfg)
    given = scheduler is not None
    if scheduler is None:
        scheduler = _own_scheduler(own, sched_cfg)
    _check_flags(scheduler, eta, karras, None if given else own)
    fam = family(scheduler)
    if fam.flow:  # (a flow pipeline was refused above)
        raise PipelineError(
            "--scheduler",
            f"{scheduler} is a flow-matching family (rectified-flow models); {pipeline!r} is a "
            f"diffusion pipeline (scheduler {own}, a beta schedule): pass --scheduler "
            f"{' or '.join(VP_NAMES)}",
        )
    if fam.edm:  # the folder's UNet has a beta (VP) schedule, checked above
        raise PipelineError(
            "--scheduler",
            f"{fam.name} preconditions an EDM network (c_in, c_noise, c_skip, c_out); this "
            f"pipeline's UNet is a VP model: use --scheduler {SDE.name} --karras",
        )
    try:
        max_steps = int(sched_cfg.get("num_train_timesteps", 1000))
        if max_steps < 1:
            raise ValueError(f"got {max_steps}")
    except (TypeError, ValueError) as err:
        raise PipelineError(
            "--pipeline",
            f"{pipeline!r}: scheduler/scheduler_config.json: num_train_timesteps must be a "
            f"positive integer ({err})",
        ) from None
    _check_clip(pipeline, sched_cfg)
    if steps > max_steps:
        raise PipelineError(
            "--steps",
            f"must be at most {max_steps} (the pipeline's training timesteps), got {steps}",
        )
    if scheduler == "ddpm" and sched_cfg.get("variance_type") in ("learned", "learned_range"):
        raise PipelineError(
            "--scheduler",
            f"ddpm with variance_type "
            f"{sched_cfg['variance_type']!r} (learned variances) cannot "
            f"be speculated; set variance_type to 'fixed_small' in "
            f"scheduler/scheduler_config.json, or pass --scheduler "
            f"ddim or euler-a",
        )
    from ..integrations.diffusers import diffusers_transitions

    overrides = {}
    if karras:  # asked for: it replaces a sigma schedule the config names
        overrides = dict.fromkeys(OTHER_SIGMAS, False) | {"use_karras_sigmas": True}
    sched = _chain_scheduler(fam, given, sched_cfg, overrides)
    if own_sched is not None:
        _check_inherited(scheduler, own, own_sched, sched)
    try:
        T = diffusers_transitions(sched, steps, **_step_options(fam, eta))
    except (ValueError, TypeError) as err:
        raise PipelineError("--scheduler", f"{scheduler}: {err}") from None
    from .memory import unet_act_bytes

    return PipelineSpec(
        name=pipeline,
        path=path,
        scheduler=scheduler,
        own_scheduler=own,
        event_shape=event_shape,
        max_steps=max_steps,
        has_draft_model=False,
        transitions=T,
        unet_class=unet_class,
        act_bytes=unet_act_bytes(unet_cfg),
        karras=bool(getattr(sched.config, "use_karras_sigmas", False)),
    )


def _positive(value) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _check_clip(pipeline: str, cfg: dict) -> None:
    """A clip range or threshold that the sampler would refuse only after loading the weights."""
    where = f"{pipeline!r}: scheduler/scheduler_config.json"
    if cfg.get("clip_sample") and not cfg.get("thresholding"):
        value = cfg.get("clip_sample_range", 1.0)
        if not _positive(value):
            raise PipelineError(
                "--pipeline",
                f"{where}: clip_sample_range must be a positive number when clip_sample is true, "
                f"got {value!r}",
            )
    if cfg.get("thresholding") and not _positive(cfg.get("sample_max_value", 1.0)):
        raise PipelineError(
            "--pipeline",
            f"{where}: sample_max_value must be a positive number when thresholding is true, "
            f"got {cfg.get('sample_max_value')!r}",
        )


def _step_options(fam: Family, eta) -> dict:
    """The --eta the family's step takes (DDIM's, default DEFAULT_ETA); Euler's churn (the most,
    gamma = sqrt(2) - 1 at every step: there is no flag for it); none for the others."""
    if "s_churn" in fam.options:
        return {"s_churn": math.inf}
    return {"eta": DEFAULT_ETA if eta is None else eta} if "eta" in fam.options else {}


def _resolve_digits(
    name: str, scheduler: Optional[str], steps: int, eta: Optional[float], karras: bool = False
) -> PipelineSpec:
    from .. import models
    from .memory import DIGITS_ACT_BYTES

    # the model's own transitions, without its weights (models.load would read them)
    em = models.digits_flow_schedule() if name == "digits-flow" else models.digits_schedule()
    scheduler = scheduler or em.default_sampler
    _check_flags(scheduler, eta, karras)
    if steps > models.TRAIN_TIMESTEPS:
        raise PipelineError(
            "--steps",
            f"must be at most {models.TRAIN_TIMESTEPS} (the model's "
            f"training timesteps), got {steps}",
        )
    options = _step_options(family(scheduler), eta)
    if karras:
        options["sigma_schedule"] = "karras"
    try:
        T = em.transitions(steps, scheduler, **options)
    except (ValueError, TypeError) as err:
        raise PipelineError("--scheduler", f"{scheduler}: {err}") from None
    return PipelineSpec(
        name=name,
        path=None,
        scheduler=scheduler,
        own_scheduler=em.default_sampler,
        event_shape=em.event_shape,
        max_steps=models.TRAIN_TIMESTEPS,
        has_draft_model=True,
        transitions=T,
        act_bytes=DIGITS_ACT_BYTES,
        karras=karras,
    )


# ----------------------------------------------------------------------------- loading
def load_unet(path: Path, device: torch.device, dtype: torch.dtype):
    """The pipeline's UNet in eval mode on ``device`` in ``dtype`` (no accelerate needed)."""
    import diffusers

    from ..integrations.diffusers import quiet_diffusers

    cfg = json.loads((path / "unet" / "config.json").read_text())
    cls = getattr(diffusers, cfg["_class_name"])
    try:
        with quiet_diffusers():  # without accelerate, from_pretrained warns on every load
            unet = cls.from_pretrained(
                path, subfolder="unet", torch_dtype=dtype, low_cpu_mem_usage=False
            )
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as err:
        # what the header checks cannot see (pickled weights, a corrupt tensor); the loader's
        # message is many lines and chained: its first line names the problem
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise PipelineError(
            "--pipeline",
            f"{str(path)!r}: the unet weights do not load: {type(err).__name__}: {first}",
        ) from None
    return unet.to(device).eval()


def load_network(spec: PipelineSpec, device: torch.device, dtype: torch.dtype):
    """(target model(x, t), draft network or None) for a resolved pipeline: weights in ``dtype``,
    called on (and returning) float32 states."""
    if spec.path is None:
        from .. import models

        m = models.load(spec.name, device=device, dtype=dtype)  # casts to its weights' dtype
        return m.target, m.draft
    from ..integrations.diffusers import DiffusersModel

    net = DiffusersModel(load_unet(spec.path, device, dtype))
    return (net if dtype == torch.float32 else CastNet(net, dtype)), None


def make_draft(kind: str, draft_net):
    from ..sampling.drafts import DraftModelDraft, FrozenTargetDraft

    if kind == "model":
        return DraftModelDraft(draft_net)
    return FrozenTargetDraft("x0" if kind == "frozen-x0" else "eps", prefetch_root=True)


# ----------------------------------------------------------------------------- output
def grid_scale(side: int, min_tile: int = 64, max_tile: int = 256) -> int:
    """The nearest-neighbour upscaling of a tile with ``side`` pixels: to at least ``min_tile``
    pixels, and up to 4x while that stays within ``max_tile`` (8 -> 64, 32 -> 128, 256 -> 256):
    8x8 digits and 32x32 patches are too small to inspect at 1:1."""
    return max(1, math.ceil(min_tile / side), min(4, max_tile // side))


def image_grid(x: torch.Tensor, scale: Optional[int] = None):
    """uint8 HxW(x3) array of up to 64 samples [B, C, H, W] in [-1, 1], tiles upscaled by
    ``scale`` (default: :func:`grid_scale`)."""
    import numpy as np

    x = x[:64].detach().float().cpu()
    if x.dim() != 4:
        raise ValueError(f"image_grid needs samples [B, C, H, W], got {tuple(x.shape)}")
    if x.shape[1] not in (1, 3):  # no natural colour mapping: show the channel mean
        x = x.mean(1, keepdim=True)
    if scale is None:
        scale = grid_scale(max(x.shape[2], x.shape[3]))
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    B, C, H, W = img.shape
    cols = math.ceil(math.sqrt(B))
    rows = math.ceil(B / cols)
    pad = 2
    grid = torch.zeros(C, rows * (H + pad) + pad, cols * (W + pad) + pad, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, cols)
        grid[
            :,
            pad + r * (H + pad) : pad + r * (H + pad) + H,
            pad + c * (W + pad) : pad + c * (W + pad) + W,
        ] = img[i]
    arr = grid.permute(1, 2, 0).numpy()
    return np.ascontiguousarray(arr[..., 0] if C == 1 else arr)


def save_png(path: Path, x: torch.Tensor) -> None:
    from PIL import Image

    Image.fromarray(image_grid(x)).save(path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_sample(args, spec: PipelineSpec) -> int:
    """Sample with the checked arguments; print a summary (and the cost table with --compare)."""
    from ..sampling.ancestral import AncestralSampler
    from ..sampling.sampler import COMPACT_MIN_CHAINS_CPU, SpeculativeSampler
    from .demo import cost_table, optional_module, two_sample_or_note, warm_times
    from .output import RunOutput, sample_files

    # --dtype is the network's precision; the chains stay float32 (see CastNet)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    pil = optional_module("PIL", "PNG output")
    t0 = time.perf_counter()
    net, draft_net = load_network(spec, device, dtype)
    load_s = time.perf_counter() - t0
    T = spec.transitions
    draft = make_draft(args.draft, draft_net)
    print(
        f"pipeline: {spec.name} ({spec.unet_class or 'embedded digits MLP'}, samples "
        f"{tuple(spec.event_shape)}), scheduler {spec.scheduler_label} (the pipeline's own: "
        f"{spec.own_scheduler}), {args.steps} steps, window {args.window}, draft {args.draft}, "
        f"batch {args.batch}, {device} {args.dtype}, seed {args.seed}; loaded in {load_s:.2f}s"
    )
    progress = not args.no_progress
    # first-call costs (allocator, kernel selection) out of both timings; on at most one
    # invocation's states, so a batch that runs in chunks does not fail here
    from .memory import warmup_states

    warm = warmup_states(args.batch, spec.act_bytes, args.max_batch, args.device)
    with torch.inference_mode():
        net(
            torch.zeros(warm, *spec.event_shape, device=device),
            torch.full((warm,), int(T.timesteps[0]), device=device),
        )

    def run(sampler, seed):
        _sync(device)
        t = time.perf_counter()
        res = sampler.sample(
            args.batch,
            spec.event_shape,
            device=device,
            generator=torch.Generator().manual_seed(seed),
        )
        _sync(device)
        return res, time.perf_counter() - t

    # A UNet on a CPU is compute-bound: every evaluation counts. From 2 chains the static round's
    # compact call evaluates what the ragged round does and runs faster; one chain keeps the full
    # B (L + 1) call, where the ragged round evaluates fewer states, so one chain goes ragged.
    one_unet_chain = (
        device.type == "cpu" and spec.unet_class is not None and args.batch < COMPACT_MIN_CHAINS_CPU
    )
    path = "ragged" if one_unet_chain else "auto"
    spec_res, spec_wall = run(
        SpeculativeSampler(
            net,
            T,
            draft=draft,
            window=args.window,
            progress=progress,
            path=path,
            max_batch=args.max_batch,
        ),
        args.seed,
    )
    st = spec_res.stats
    print(
        f"speculative: {st.target_calls} sequential target calls for {args.steps} steps "
        f"({st.target_calls / args.steps:.3f} of ancestral), {st.target_evals} target evaluations, "
        f"{st.draft_calls} draft calls, wall {spec_wall:.2f}s"
    )
    record = {
        "args": vars(args),
        "pipeline": {
            "name": spec.name,
            "path": None if spec.path is None else str(spec.path),
            "unet_class": spec.unet_class,
            "scheduler": spec.scheduler,
            "karras": spec.karras,
            "own_scheduler": spec.own_scheduler,
            "event_shape": list(spec.event_shape),
            "transitions": repr(T),
        },
        "load_s": load_s,
        "speculative": st.as_dict(),
        "wall_s": {"speculative": spec_wall},
    }
    rc, anc_res = 0, None
    if args.compare:
        anc_seed = args.seed + INDEPENDENT_SEED_OFFSET
        anc_res, anc_wall = run(
            AncestralSampler(net, T, progress=progress, max_batch=args.max_batch), anc_seed
        )
        warm = warm_times(
            lambda: run(AncestralSampler(net, T, max_batch=args.max_batch), anc_seed)[0],
            lambda: run(
                SpeculativeSampler(
                    net, T, draft=draft, window=args.window, path=path, max_batch=args.max_batch
                ),
                args.seed,
            )[0],
            args.reps,
        )
        print()
        print(cost_table(anc_res.stats, st, warm))
        t1 = time.perf_counter()
        p, note = two_sample_or_note(spec_res.samples, anc_res.samples, args.seed)
        if p is None:
            print(f"two-sample test: {note}")
        else:
            verdict = "no evidence of a difference" if p > 1e-3 else "DIFFERENT"
            print(
                f"two-sample test, speculative vs an independent ancestral run (seed {anc_seed}; "
                f"per-coordinate KS + energy distance, Bonferroni): p = {p:.3f} ({verdict}; "
                f"{time.perf_counter() - t1:.1f}s)"
            )
            rc = 0 if p > 1e-3 else 1
        record.update(
            ancestral=anc_res.stats.as_dict(),
            ancestral_seed=anc_seed,
            ratios=st.relative_to(anc_res.stats),
            two_sample_pvalue=p,
            two_sample_note=note,
        )
        record["wall_s"]["ancestral"] = anc_wall
        record["warm_wall_time_s"] = {
            "ancestral": warm.ancestral,
            "speculative": warm.speculative,
            "threads": warm.threads,
            "ratio": warm.ratio,
        }
    samples_png, ancestral_png, stats_json = sample_files()
    with RunOutput(args.out, args.overwrite) as out:
        if pil:
            save_png(out.path(samples_png), spec_res.samples)
            if anc_res is not None:
                save_png(out.path(ancestral_png), anc_res.samples)
        # last: a folder with stats.json holds a complete run
        out.path(stats_json).write_text(json.dumps(record, indent=1, default=str))
    print(f"wrote {', '.join(map(str, out.written))}")
    return rc
