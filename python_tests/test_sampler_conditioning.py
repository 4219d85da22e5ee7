"""Per-chain conditioning (``sample(..., model_kwargs=...)``): every network call on a chain's
states gets that chain's row of each kwarg, on every sampler path, and the law is the conditional
ancestral chain's."""

from __future__ import annotations

import pytest
import torch
from preamble import ABAR, SINGLE_THREAD, gen

from specdiff_kernels.models.gmm import GMMDenoiser, make_gmm
from specdiff_kernels.sampling.ancestral import AncestralSampler
from specdiff_kernels.sampling.drafts import DraftModelDraft, FrozenTargetDraft
from specdiff_kernels.sampling.sampler import SpeculativeSampler
from specdiff_kernels.sampling.transitions import (
    ddpm_transitions,
)
from specdiff_kernels.testing.two_sample import bonferroni, per_coordinate_ks_pvalue

D = 4
CLASSES = 3

pytestmark = SINGLE_THREAD


class ClassConditionalGMM(torch.nn.Module):
    """``model(x, t, class_labels)``: the exact denoiser of a different Gaussian mixture per class
    (far-apart means, so a chain given the wrong label ends in the wrong place)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.per_class = torch.nn.ModuleList(
            GMMDenoiser(make_gmm(D, K=2, seed=seed + c, mean_scale=1.0), ABAR)
            for c in range(CLASSES)
        )
        self.offsets = torch.tensor([-3.0, 0.0, 3.0], dtype=torch.float64)
        self.calls = 0

    def forward(self, x, t, class_labels):
        assert class_labels.shape == (x.shape[0],), "one label per row"
        self.calls += 1
        out = torch.stack([m(x, t) for m in self.per_class])  # [C, n, *E]
        return out[class_labels, torch.arange(x.shape[0])]


def setup(steps=40):
    return ClassConditionalGMM(), ddpm_transitions(ABAR, num_inference_steps=steps)


def labels(B: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, CLASSES, (B,), generator=gen(seed))


SAMPLERS = {
    "static": lambda m, T: SpeculativeSampler(m, T, window=5, path="static"),
    "ragged": lambda m, T: SpeculativeSampler(m, T, window=5, path="ragged"),
    "noprefetch": lambda m, T: SpeculativeSampler(
        m, T, FrozenTargetDraft("x0", prefetch_root=False), 5
    ),
    "draft_model": lambda m, T: SpeculativeSampler(
        m, T, DraftModelDraft(ClassConditionalGMM(seed=7)), 4
    ),
    "adaptive": lambda m, T: SpeculativeSampler(m, T, window="adaptive"),
    "ancestral": lambda m, T: AncestralSampler(m, T),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_each_chain_gets_its_own_conditioning(name):
    """A chain's sample in a mixed-label batch equals the same chain (same id, same seed) sampled
    alone with its label: the rows of every call were matched to their chains."""
    model, T = setup()
    B = 6
    y = labels(B)
    assert len(set(y.tolist())) > 1
    sampler = SAMPLERS[name](model, T)
    both = sampler.sample(
        B,
        (D,),
        generator=torch.Generator().manual_seed(5),
        dtype=torch.float64,
        model_kwargs={"class_labels": y},
    ).samples
    for c in range(B):
        alone = sampler.sample(
            1,
            (D,),
            generator=torch.Generator().manual_seed(5),
            chain_ids=[c],
            dtype=torch.float64,
            model_kwargs={"class_labels": y[c : c + 1]},
        ).samples
        torch.testing.assert_close(both[c : c + 1], alone, rtol=1e-9, atol=1e-9)
    # and the label mattered: another label moves the chain
    other = sampler.sample(
        1,
        (D,),
        generator=torch.Generator().manual_seed(5),
        chain_ids=[0],
        dtype=torch.float64,
        model_kwargs={"class_labels": (y[:1] + 1) % CLASSES},
    ).samples
    assert (other - both[:1]).abs().max() > 0.5


def test_nested_kwargs_are_gathered_per_row():
    """A dict-valued kwarg (diffusers' ``added_cond_kwargs``) is gathered row by row too."""
    base, T = setup(20)

    class Nested(torch.nn.Module):
        def forward(self, x, t, added_cond_kwargs):
            return base(x, t, added_cond_kwargs["label"])

    y = labels(5)
    s = SpeculativeSampler(Nested(), T, window=4, path="ragged")
    a = s.sample(
        5,
        (D,),
        generator=torch.Generator().manual_seed(2),
        dtype=torch.float64,
        model_kwargs={"added_cond_kwargs": {"label": y}},
    ).samples
    b = (
        SpeculativeSampler(base, T, window=4, path="ragged")
        .sample(
            5,
            (D,),
            generator=torch.Generator().manual_seed(2),
            dtype=torch.float64,
            model_kwargs={"class_labels": y},
        )
        .samples
    )
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _final(sampler, y, seed):
    return sampler.sample(
        y.shape[0],
        (D,),
        generator=torch.Generator().manual_seed(seed),
        dtype=torch.float64,
        model_kwargs={"class_labels": y},
    ).samples.numpy()


@pytest.mark.parametrize("path", ["static", "ragged"])
def test_conditional_law_matches_ancestral(path):
    """Speculative vs an independent conditional ancestral run, per class: per-coordinate KS with
    Bonferroni over classes; and the same test rejects a run given the wrong labels."""
    model, T = setup(30)
    B = 1500
    y = torch.arange(B) % CLASSES
    spec = _final(SpeculativeSampler(model, T, window=6, path=path), y, seed=11)
    anc = _final(AncestralSampler(model, T), y, seed=12)
    wrong = _final(SpeculativeSampler(model, T, window=6, path=path), (y + 1) % CLASSES, seed=11)
    yn = y.numpy()
    p = bonferroni([per_coordinate_ks_pvalue(spec[yn == c], anc[yn == c]) for c in range(CLASSES)])
    p_wrong = bonferroni(
        [per_coordinate_ks_pvalue(wrong[yn == c], anc[yn == c]) for c in range(CLASSES)]
    )
    assert p > 0.01, p
    assert p_wrong < 1e-6, p_wrong


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"class_labels": torch.zeros(3, dtype=torch.long)},
            r"model_kwargs\['class_labels'\] must have num_chains=4 rows",
        ),
        (
            {"class_labels": torch.tensor(1)},
            r"model_kwargs\['class_labels'\] must have num_chains=4 rows",
        ),
        ({"class_labels": [0, 1, 2, 3]}, r"model_kwargs\['class_labels'\] must be a tensor"),
        (
            {"added": {"label": torch.zeros(2)}},
            r"model_kwargs\['added'\]\['label'\] must have num_chains=4",
        ),
        ([("class_labels", torch.zeros(4))], r"model_kwargs must be a dict"),
    ],
)
@pytest.mark.parametrize("name", ["static", "ragged", "ancestral"])
def test_bad_model_kwargs_refused_before_any_call(kwargs, match, name):
    model, T = setup(10)
    with pytest.raises((TypeError, ValueError), match=match):
        SAMPLERS[name](model, T).sample(4, (D,), model_kwargs=kwargs)
    assert model.calls == 0
