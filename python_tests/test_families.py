"""The family registry (``sampling/families.py``) and its readers agree: the diffusers adapter,
``specdiff sample`` / ``specdiff policy``, ``EmbeddedModel.transitions`` and the docs' tables."""

from __future__ import annotations

import argparse
import inspect
import re
from pathlib import Path

import pytest
import torch

from specdiff_kernels import models
from specdiff_kernels.cli.commands import add_sample_arguments
from specdiff_kernels.cli.policy import add_policy_arguments
from specdiff_kernels.models.pusht_loop import FAMILIES as POLICY_FAMILIES
from specdiff_kernels.models.pusht_loop import PlannerConfig
from specdiff_kernels.sampling.families import FAMILIES, NAMES, canonical, family, for_scheduler

ROOT = Path(__file__).resolve().parent.parent
WITH_SCHEDULER = [f for f in FAMILIES if f.scheduler is not None]
# what a builder takes that is the model's own (EmbeddedModel fixes them), not a family option
MODEL_FIXED = {"alphas_cumprod", "betas", "num_inference_steps", "prediction", "clip_sample"}
MODEL_FIXED |= {"num_train_timesteps"}  # a flow model's


def flow_model() -> models.EmbeddedModel:
    """A rectified-flow EmbeddedModel (no networks): what the flow families build on."""
    return models.EmbeddedModel("flow", None, None, (4,), None, "flow_prediction")


def ids(fams) -> list[str]:
    return [f.name for f in fams]


def test_names_are_unique_and_aliases_resolve():
    spellings = [n for f in FAMILIES for n in (f.name, *f.aliases)]
    assert len(spellings) == len(set(spellings))
    for f in FAMILIES:
        assert family(f.name) is f and canonical(f.name) == f.name
        for alias in f.aliases:
            assert family(alias) is f and canonical(alias) == f.name
    assert family("euler_ancestral").name == "euler-a"  # EmbeddedModel's spelling before


@pytest.mark.parametrize("bad,exc", [("heun", ValueError), (3, TypeError), (None, TypeError)])
def test_unknown_family_is_refused_in_one_line(bad, exc):
    with pytest.raises(exc) as err:
        family(bad, "sampler")
    msg = str(err.value)
    assert type(err.value) is exc and "\n" not in msg
    assert msg.startswith("sampler must be one of") and all(n in msg for n in NAMES)
    assert canonical(bad) == bad  # left for argparse's choices to refuse


@pytest.mark.parametrize("fam", FAMILIES, ids=ids(FAMILIES))
def test_options_are_the_builders(fam):
    """The registry's options are exactly the builder's keyword arguments that are not the
    model's own, so a new builder option is either listed or fails here."""
    params = inspect.signature(fam.builder).parameters
    takes = set(params) - MODEL_FIXED - {"timesteps"}
    assert set(fam.options) == takes
    assert ("clip_sample" in params) is fam.clips


@pytest.mark.parametrize("fam", FAMILIES, ids=ids(FAMILIES))
def test_every_family_builds_on_an_embedded_model(fam):
    m = flow_model() if fam.flow else models.load("gmm", dim=4)
    options = {"eta": 1.0} if "eta" in fam.options else {}
    T = m.transitions(12, fam.name, **options)
    assert T.num_steps == 12 and T.multistep is fam.multistep
    for alias in fam.aliases:
        U = m.transitions(12, alias, **options)
        assert torch.equal(U.c_x0, T.c_x0) and torch.equal(U.std, T.std)
    with pytest.raises(TypeError, match="bogus"):
        m.transitions(12, fam.name, bogus=1)


# ----------------------------------------------------------------------------- diffusers
diffusers = pytest.importorskip("diffusers")
from specdiff_kernels.integrations import diffusers as adapter  # noqa: E402

DDPM_CONFIG = dict(diffusers.DDPMScheduler().config)


@pytest.mark.parametrize("fam", WITH_SCHEDULER, ids=ids(WITH_SCHEDULER))
def test_scheduler_class_exists_and_maps_back(fam):
    """The class exists in the installed diffusers and takes the family's settings; a scheduler
    built from another's config by the one builder is this family's again in the adapter."""
    cls = getattr(diffusers, fam.scheduler)
    assert issubclass(cls, diffusers.SchedulerMixin)
    takes = inspect.signature(cls.__init__).parameters
    assert all(key in takes for key, _ in fam.scheduler_config)
    assert for_scheduler(fam.scheduler) is fam
    sched = adapter.scheduler_from_config(DDPM_CONFIG, fam.name)
    assert type(sched) is cls
    assert all(sched.config[k] == v for k, v in fam.scheduler_config)
    assert adapter._supported_family(sched) is fam
    eta = {"eta": 1.0} if "eta" in fam.options else {}
    T = adapter.diffusers_transitions(sched, 10, **eta)
    assert T.num_steps == 10 and T.multistep is fam.multistep


@pytest.mark.parametrize("fam", FAMILIES, ids=ids(FAMILIES))
def test_a_family_refuses_the_other_kind_of_model_in_one_line(fam):
    """A flow family on a diffusion model, and a diffusion family on a flow model."""
    other = models.load("gmm", dim=4) if fam.flow else flow_model()
    with pytest.raises(ValueError) as err:
        other.transitions(12, fam.name)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(fam.name) and "flow" in msg


def test_the_adapter_tabulates_every_family_diffusers_has():
    assert set(adapter._TABULATE) == {f.name for f in WITH_SCHEDULER}
    assert adapter.SUPPORTED == tuple(f.scheduler for f in WITH_SCHEDULER)


# ----------------------------------------------------------------------------- the CLI
def _action(add, flag: str) -> argparse.Action:
    parser = argparse.ArgumentParser()
    add(parser)
    return next(a for a in parser._actions if flag in a.option_strings)


def test_cli_choices_are_the_registry_names():
    sample = _action(add_sample_arguments, "--scheduler")
    assert tuple(sample.choices) == NAMES
    assert sample.type("euler_ancestral") == "euler-a"  # an alias is accepted
    policy = _action(add_policy_arguments, "--sampler")
    assert set(policy.choices) == set(POLICY_FAMILIES) and set(POLICY_FAMILIES) <= set(NAMES)
    assert PlannerConfig("dpm++2m-sde").family == "dpm++2m-sde"


# ----------------------------------------------------------------------------- the docs
def _table(text: str, header: str) -> list[list[str]]:
    """The cells of the rows of the markdown table whose header row starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows


def test_readme_table_is_the_registry():
    """README's table of supported samplers: one row per family with a diffusers scheduler, in
    the registry's order, naming its class and settings, CLI name, label and multistep."""
    rows = _table((ROOT / "README.md").read_text(), "| diffusers scheduler |")
    assert len(rows) == len(WITH_SCHEDULER)
    for cells, fam in zip(rows, WITH_SCHEDULER):
        text = fam.scheduler_text
        assert cells[0] == f"`{fam.scheduler}`{text[len(fam.scheduler) :]}", fam.name
        assert cells[1] == f"`{fam.name}`"
        assert cells[2].startswith(fam.label)
        assert ("(multistep)" in cells[2]) is fam.multistep


def test_cli_reference_lists_the_registry_names():
    text = (ROOT / "docs" / "cli.md").read_text()
    listed = re.search(r"`--scheduler ([^`]+)`", text).group(1).split("\\|")
    assert tuple(listed) == NAMES
    policy = re.search(r"`--sampler (ddpm[^`]+)`", text).group(1).split("\\|")
    assert policy == list(POLICY_FAMILIES)
