"""diffusers adapter: per-chain conditioning and classifier-free guidance.

Tiny randomly initialised diffusers models built from configs (no downloads): a text-conditional
``UNet2DConditionModel`` (cross-attention on per-chain prompt embeddings), a class-conditional
``UNet2DModel`` (``num_class_embeds``, the last id is the null class) and an SDXL-style
``UNet2DConditionModel`` with ``added_cond_kwargs``.
"""

from __future__ import annotations

import functools

import pytest
import torch
from preamble import SINGLE_THREAD

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional extra")
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel  # noqa: E402
from tiny_diffusers import tiny_unet  # noqa: E402

from specdiff_kernels import AncestralSampler, DraftModelDraft, SpeculativeSampler  # noqa: E402
from specdiff_kernels.integrations.diffusers import (  # noqa: E402
    DiffusersModel,
    diffusers_transitions,
    from_pipeline,
)
from specdiff_kernels.testing.two_sample import bonferroni, two_sample_pvalue  # noqa: E402

pytestmark = SINGLE_THREAD

SEQ, DIM = 3, 8  # prompt embeddings: [SEQ, DIM] per chain
NUM_CLASSES = 4  # class ids 0..3; id NULL is the unconditional ("null") class
NULL = NUM_CLASSES


def _cross_attention_unet(seed: int, **extra) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=2,
        out_channels=2,
        layers_per_block=1,
        block_out_channels=(4, 8),
        norm_num_groups=2,
        cross_attention_dim=DIM,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        **extra,
    )
    return unet.eval().requires_grad_(False)


@functools.lru_cache(maxsize=None)
def text_unet(seed: int = 0) -> UNet2DConditionModel:
    return _cross_attention_unet(seed)


@functools.lru_cache(maxsize=None)
def class_unet(seed: int = 0) -> UNet2DModel:
    return tiny_unet(
        seed, 2, block_out_channels=(4, 8), norm_num_groups=2, num_class_embeds=NUM_CLASSES + 1
    )


@functools.lru_cache(maxsize=None)
def sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL-style conditioning: cross-attention plus added_cond_kwargs text_embeds / time_ids."""
    return _cross_attention_unet(
        seed,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=DIM + 6 * 4,
    )


class CallCounter:
    """Counts the UNet's forward calls (a forward hook) and records their batch sizes."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.batches: list[int] = []
        self.handle = unet.register_forward_hook(
            lambda module, args, kwargs, out: self.batches.append(args[0].shape[0]),
            with_kwargs=True,
        )

    def __enter__(self) -> "CallCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def raw(unet, x, t, **cond):
    """The UNet's raw output, one direct call (the test's own reference)."""
    return unet(x, t, **cond).sample


def inputs(B: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 2, 8, 8, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    return x, t, g


# ------------------------------------------------------------------ the guided prediction
# Relative tolerance of guided vs hand-computed: the batched call evaluates the same rows in a
# batch twice as large (float32 conv / attention numerics differ by ~1e-7 relative), and the
# difference c - u is amplified by w; 1e-5 of the output's scale is far below any real error.
RTOL = 1e-5


def close(got, expect, what: str) -> None:
    scale = float(expect.abs().max())
    err = float((got - expect).abs().max())
    assert err <= RTOL * max(scale, 1.0), f"{what}: max error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("w", [4.0, 0.0, -1.5])
def test_text_guidance_equals_hand_computed_in_one_call(w):
    unet = text_unet()
    B = 5
    x, t, g = inputs(B)
    emb = 3 * torch.randn(B, SEQ, DIM, generator=g)
    neg = torch.randn(SEQ, DIM, generator=g)
    c = raw(unet, x, t, encoder_hidden_states=emb)
    u = raw(unet, x, t, encoder_hidden_states=neg.expand(B, SEQ, DIM))
    model = DiffusersModel(unet, guidance_scale=w, uncond={"encoder_hidden_states": neg})
    with CallCounter(unet) as calls:
        got = model(x, t, encoder_hidden_states=emb)
    assert calls.batches == [2 * B]  # both branches in ONE UNet call
    close(got, u + w * (c - u), f"w={w}")
    # the negative embedding as [1, S, D] broadcasts the same way
    model1 = DiffusersModel(unet, guidance_scale=w, uncond={"encoder_hidden_states": neg[None]})
    close(model1(x, t, encoder_hidden_states=emb), got, "uncond [1, S, D]")


def test_per_chain_uncond_overrides_the_broadcast_one():
    unet = text_unet()
    B, w = 4, 3.0
    x, t, g = inputs(B, seed=2)
    emb = 3 * torch.randn(B, SEQ, DIM, generator=g)
    neg_rows = torch.randn(B, SEQ, DIM, generator=g)
    c = raw(unet, x, t, encoder_hidden_states=emb)
    u = raw(unet, x, t, encoder_hidden_states=neg_rows)
    for model in (
        DiffusersModel(unet, guidance_scale=w),
        DiffusersModel(
            unet, guidance_scale=w, uncond={"encoder_hidden_states": torch.zeros(SEQ, DIM)}
        ),
    ):
        with CallCounter(unet) as calls:
            got = model(x, t, encoder_hidden_states=emb, uncond={"encoder_hidden_states": neg_rows})
        assert calls.batches == [2 * B]
        close(got, u + w * (c - u), "per-chain uncond")


def test_class_guidance_equals_hand_computed_and_w1_is_one_branch():
    unet = class_unet()
    B, w = 6, 4.0
    x, t, _ = inputs(B, seed=3)
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    c = raw(unet, x, t, class_labels=labels)
    u = raw(unet, x, t, class_labels=torch.full((B,), NULL))
    model = DiffusersModel(unet, guidance_scale=w, uncond={"class_labels": NULL})
    with CallCounter(unet) as calls:
        got = model(x, t, class_labels=labels)
    assert calls.batches == [2 * B]
    close(got, u + w * (c - u), "class labels")
    # w = 1 (uncond accepted, unused) and no guidance: one branch, no doubling, = conditional
    for plain in (
        DiffusersModel(unet, guidance_scale=1.0, uncond={"class_labels": NULL}),
        DiffusersModel(unet),
    ):
        with CallCounter(unet) as calls:
            got1 = plain(x, t, class_labels=labels)
        assert calls.batches == [B]
        torch.testing.assert_close(got1, c, rtol=0, atol=0)


def test_added_cond_kwargs_guidance_sdxl_style():
    """Nested conditioning: text_embeds has an unconditional counterpart, time_ids is shared."""
    unet = sdxl_unet()
    B, w = 3, 5.0
    x, t, g = inputs(B, seed=4)
    emb = torch.randn(B, SEQ, DIM, generator=g)
    pooled = torch.randn(B, DIM, generator=g)
    time_ids = torch.rand(B, 6, generator=g) * 64
    neg, neg_pooled = torch.zeros(SEQ, DIM), torch.randn(DIM, generator=g)
    c = raw(
        unet,
        x,
        t,
        encoder_hidden_states=emb,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
    )
    u = raw(
        unet,
        x,
        t,
        encoder_hidden_states=neg.expand(B, SEQ, DIM),
        added_cond_kwargs={"text_embeds": neg_pooled.expand(B, DIM), "time_ids": time_ids},
    )
    model = DiffusersModel(
        unet,
        guidance_scale=w,
        uncond={"encoder_hidden_states": neg, "added_cond_kwargs": {"text_embeds": neg_pooled}},
    )
    with CallCounter(unet) as calls:
        got = model(
            x,
            t,
            encoder_hidden_states=emb,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        )
    assert calls.batches == [2 * B]
    close(got, u + w * (c - u), "added_cond_kwargs")


def test_fixed_call_kwargs_still_work():
    unet = text_unet()
    x, t, g = inputs(2, seed=5)
    emb = torch.randn(2, SEQ, DIM, generator=g)
    model = DiffusersModel(unet, cross_attention_kwargs={"scale": 1.0})
    torch.testing.assert_close(
        model(x, t, encoder_hidden_states=emb),
        raw(unet, x, t, encoder_hidden_states=emb, cross_attention_kwargs={"scale": 1.0}),
        rtol=0,
        atol=0,
    )


# ------------------------------------------------------------------ per-chain gathering
@pytest.mark.parametrize("sampler", ["ancestral", "speculative", "draft-network"])
def test_chains_with_different_labels_get_what_each_label_alone_gives(sampler):
    """Chain c of a batch with mixed labels equals chain c of a batch where every chain has
    chain c's label: a chain's noise depends only on (seed, chain), so only the gather of its
    conditioning can make a difference. float64, so acceptance decisions do not flip on
    batch-dependent rounding."""
    unet = class_unet.__wrapped__().double()  # a fresh copy: .double() converts in place
    model = DiffusersModel(unet, guidance_scale=3.0, uncond={"class_labels": NULL})
    tr = diffusers_transitions(DDPMScheduler(clip_sample=True), 12)
    labels = torch.tensor([0, 3, 1, 1, 2, 0, 3, 2])
    B = labels.numel()

    def run(lab):
        kw = dict(
            generator=torch.Generator().manual_seed(7),
            dtype=torch.float64,
            model_kwargs={"class_labels": lab},
        )
        if sampler == "ancestral":
            return AncestralSampler(model, tr).sample(B, (2, 8, 8), **kw).samples
        if sampler == "draft-network":  # a guided draft UNet gets the same per-chain labels
            return (
                SpeculativeSampler(model, tr, window=4, draft=DraftModelDraft(draft))
                .sample(B, (2, 8, 8), **kw)
                .samples
            )
        return SpeculativeSampler(model, tr, window=4).sample(B, (2, 8, 8), **kw).samples

    draft = DiffusersModel(
        class_unet.__wrapped__(seed=1).double(), guidance_scale=2.0, uncond={"class_labels": NULL}
    )
    mixed = run(labels)
    for lab in range(NUM_CLASSES):
        alone = run(torch.full((B,), lab))
        rows = labels == lab
        torch.testing.assert_close(
            mixed[rows], alone[rows], rtol=0, atol=1e-9, msg=f"{sampler}: chains with label {lab}"
        )
        assert not torch.allclose(mixed[~rows], alone[~rows], atol=1e-3), (
            "labels make no difference: the test would be vacuous"
        )


@pytest.mark.parametrize("sampler", ["ancestral", "speculative"])
def test_per_chain_prompts_and_negatives_through_the_sampler(sampler):
    """Per-chain prompt embeddings AND per-chain negative embeddings (``model_kwargs["uncond"]``):
    chain c of the mixed batch equals chain c of a batch where every chain has chain c's pair."""
    unet = text_unet.__wrapped__().double()
    model = DiffusersModel(
        unet, guidance_scale=4.0, uncond={"encoder_hidden_states": torch.zeros(SEQ, DIM)}
    )
    tr = diffusers_transitions(DDPMScheduler(clip_sample=True), 10)
    g = torch.Generator().manual_seed(12)
    B = 4
    emb = 3 * torch.randn(B, SEQ, DIM, generator=g, dtype=torch.float64)
    neg = torch.randn(B, SEQ, DIM, generator=g, dtype=torch.float64)

    def run(e, n):
        kw = dict(
            generator=torch.Generator().manual_seed(13),
            dtype=torch.float64,
            model_kwargs={"encoder_hidden_states": e, "uncond": {"encoder_hidden_states": n}},
        )
        if sampler == "ancestral":
            return AncestralSampler(model, tr).sample(B, (2, 8, 8), **kw).samples
        return SpeculativeSampler(model, tr, window=4).sample(B, (2, 8, 8), **kw).samples

    mixed = run(emb, neg)
    for c in range(B):
        alone = run(emb[c].expand_as(emb), neg[c].expand_as(neg))
        torch.testing.assert_close(
            mixed[c], alone[c], rtol=0, atol=1e-9, msg=f"{sampler}: chain {c}"
        )
        # the per-chain negative is used (not the constructor's zeros)
        other = run(emb[c].expand_as(emb), torch.zeros_like(neg))
        assert not torch.allclose(mixed[c], other[c], atol=1e-3), f"chain {c}: negative ignored"


# ------------------------------------------------------------------ the law
W, STEPS, WINDOW, N_CHAINS = 4.0, 20, 4, 600


def prompts_and_negative():
    g = torch.Generator().manual_seed(11)
    prompts = 3 * torch.randn(2, SEQ, DIM, generator=g)  # two prompts, alternating by chain
    return prompts, torch.zeros(SEQ, DIM)


def scheduler_loop_cfg(unet, sched, emb, neg, w, seed):
    """diffusers' own loop with pipeline-style guidance (StableDiffusionPipeline): latents
    doubled, one UNet call on [negative, prompt] embeddings, ``u + w (c - u)``, then
    ``scheduler.step`` -- written independently of the adapter."""
    n = emb.shape[0]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=g) * sched.init_noise_sigma
    both = torch.cat([neg.expand(n, *neg.shape), emb])
    for t in sched.timesteps:
        latent_in = sched.scale_model_input(torch.cat([x] * 2), t)
        out_u, out_c = unet(latent_in, t, encoder_hidden_states=both).sample.chunk(2)
        x = sched.step(out_u + w * (out_c - out_u), t, x, generator=g).prev_sample
    return x


def per_prompt_pvalue(x, y, which):
    """Two-sample test per prompt group (chains of prompt j in x vs in y), Bonferroni."""
    return bonferroni([two_sample_pvalue(x[which == j], y[which == j], seed=j) for j in (0, 1)])


@functools.lru_cache(maxsize=None)
def law_samples():
    unet = text_unet()
    prompts, neg = prompts_and_negative()
    which = torch.arange(N_CHAINS) % 2
    emb = prompts[which]
    sched = DDPMScheduler(clip_sample=True)
    sched.set_timesteps(STEPS)
    model = DiffusersModel(unet, guidance_scale=W, uncond={"encoder_hidden_states": neg})
    tr = diffusers_transitions(DDPMScheduler(clip_sample=True), STEPS)
    # max_batch: the round's largest call in one invocation (the CPU default would chunk it)
    sampler = SpeculativeSampler(model, tr, window=WINDOW, max_batch=N_CHAINS * (WINDOW + 1))
    with torch.inference_mode():
        ref = scheduler_loop_cfg(unet, sched, emb, neg, W, seed=5)
        with CallCounter(unet) as calls:
            spec = sampler.sample(
                N_CHAINS,
                (2, 8, 8),
                generator=torch.Generator().manual_seed(6),
                model_kwargs={"encoder_hidden_states": emb},
            )
        # guidance adds no sequential call: one (doubled) UNet call per target call
        assert len(calls.batches) == spec.stats.target_calls
        assert all(b % 2 == 0 for b in calls.batches)
        # deliberately mismatched conditioning: every chain gets its neighbour's prompt
        wrong = sampler.sample(
            N_CHAINS,
            (2, 8, 8),
            generator=torch.Generator().manual_seed(8),
            model_kwargs={"encoder_hidden_states": emb.roll(1, 0)},
        )
    return which, ref, spec, wrong


def test_guided_speculative_sampling_has_the_scheduler_loops_law():
    which, ref, spec, _ = law_samples()
    assert spec.stats.target_calls <= STEPS
    p = per_prompt_pvalue(spec.samples, ref, which)
    print(f"\nguided speculative vs diffusers' loop: p = {p:.3g}")
    assert p > 0.01, f"guided speculative samples differ from the scheduler's loop (p={p:.3g})"


def test_mismatched_conditioning_is_detected():
    """Power: the same test rejects when each chain is sampled with its neighbour's prompt."""
    which, ref, _, wrong = law_samples()
    p = per_prompt_pvalue(wrong.samples, ref, which)
    print(f"\nmismatched prompts vs diffusers' loop: p = {p:.3g}")
    assert p < 1e-3, f"the two-sample test cannot see mismatched conditioning (p={p:.3g})"


# ------------------------------------------------------------------ from_pipeline
def test_from_pipeline_with_guidance():
    unet = class_unet()
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    model, tr = from_pipeline(pipe, 10, guidance_scale=2.0, uncond={"class_labels": NULL})
    assert model.guided and tr.num_steps == 10
    x, t, _ = inputs(2, seed=9)
    labels = torch.tensor([1, 2])
    c, u = (
        raw(unet, x, t, class_labels=labels),
        raw(unet, x, t, class_labels=torch.tensor([NULL] * 2)),
    )
    close(model(x, t, class_labels=labels), u + 2.0 * (c - u), "from_pipeline")


# ------------------------------------------------------------------ bad arguments
def one_line(excinfo) -> None:
    assert "\n" not in str(excinfo.value), str(excinfo.value)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (
            dict(guidance_scale=float("nan"), uncond={"class_labels": NULL}),
            ValueError,
            "guidance_scale must be a finite number",
        ),
        (
            dict(guidance_scale=float("inf"), uncond={"class_labels": NULL}),
            ValueError,
            "guidance_scale must be a finite number",
        ),
        (
            dict(guidance_scale="4", uncond={"class_labels": NULL}),
            TypeError,
            "guidance_scale must be a real number",
        ),
        (dict(uncond={"class_labels": NULL}), ValueError, "uncond is given without guidance_scale"),
        (dict(guidance_scale=4.0, uncond=[NULL]), TypeError, "uncond must be a dict"),
        (
            dict(guidance_scale=4.0, uncond={"class_labels": "null"}),
            TypeError,
            r"uncond\['class_labels'\]",
        ),
        (
            dict(guidance_scale=4.0, uncond={"class_labels": NUM_CLASSES + 1}),
            ValueError,
            "num_class_embeds",
        ),
        (dict(guidance_scale=4.0, uncond={"class_labels": 1.5}), ValueError, "num_class_embeds"),
        (
            dict(guidance_scale=4.0, uncond={"class_labels": NULL}, class_labels=torch.zeros(1)),
            ValueError,
            "fixed call argument",
        ),
    ],
)
def test_bad_constructor_arguments(kwargs, err, match):
    with pytest.raises(err, match=match) as e:
        DiffusersModel(class_unet(), **kwargs)
    one_line(e)


def test_bad_call_arguments_are_refused_before_any_unet_call():
    B = 4
    x, t, g = inputs(B, seed=10)
    emb = torch.randn(B, SEQ, DIM, generator=g)
    cases = [
        (
            DiffusersModel(class_unet(), guidance_scale=4.0),
            dict(class_labels=torch.zeros(B, dtype=torch.long)),
            "needs unconditional inputs",
        ),
        (
            DiffusersModel(class_unet(), guidance_scale=4.0, uncond={"class_labels": NULL}),
            dict(class_labels=torch.zeros(B - 1, dtype=torch.long)),
            r"'class_labels' has shape \(3,\).*4 rows",
        ),
        (
            DiffusersModel(class_unet(), guidance_scale=4.0, uncond={"class_labels": NULL}),
            dict(class_labels=torch.tensor(0)),
            "one row per state",
        ),
        (
            DiffusersModel(class_unet(), guidance_scale=4.0, uncond={"class_labels": NULL}),
            {},
            "no conditional counterpart",
        ),
        (
            DiffusersModel(class_unet()),
            dict(
                class_labels=torch.zeros(B, dtype=torch.long),
                uncond={"class_labels": torch.zeros(B, dtype=torch.long)},
            ),
            "no guidance_scale",
        ),
        (
            DiffusersModel(
                text_unet(),
                guidance_scale=4.0,
                uncond={"encoder_hidden_states": torch.zeros(2, SEQ, DIM)},
            ),
            dict(encoder_hidden_states=emb),
            r"uncond\['encoder_hidden_states'\] has shape \(2, 3, 8\)",
        ),
        (
            DiffusersModel(text_unet(), guidance_scale=4.0),
            dict(
                encoder_hidden_states=emb,
                uncond={"encoder_hidden_states": torch.zeros(B, SEQ + 1, DIM)},
            ),
            r"uncond\['encoder_hidden_states'\] has shape \(4, 4, 8\)",
        ),
        (
            DiffusersModel(
                text_unet(),
                guidance_scale=4.0,
                uncond={"encoder_hidden_states": torch.zeros(SEQ, DIM)},
            ),
            dict(encoder_hidden_states=emb[:2]),
            r"'encoder_hidden_states' has shape \(2, 3, 8\)",
        ),
        (
            DiffusersModel(text_unet(), cross_attention_kwargs={}),
            dict(encoder_hidden_states=emb, cross_attention_kwargs={}),
            "both as a fixed call argument",
        ),
        (
            DiffusersModel(
                sdxl_unet(), guidance_scale=4.0, uncond={"added_cond_kwargs": torch.zeros(DIM)}
            ),
            dict(
                encoder_hidden_states=emb,
                added_cond_kwargs={
                    "text_embeds": torch.zeros(B, DIM),
                    "time_ids": torch.zeros(B, 6),
                },
            ),
            r"uncond\['added_cond_kwargs'\] must be a dict",
        ),
    ]
    for model, kw, match in cases:
        with (
            CallCounter(model.unet) as calls,
            pytest.raises((ValueError, TypeError), match=match) as e,
        ):
            model(x, t, **kw)
        one_line(e)
        assert calls.batches == [], f"{match}: the UNet was called before the error"


def test_sampler_refuses_conditioning_with_wrong_rows():
    unet = class_unet()
    model = DiffusersModel(unet, guidance_scale=4.0, uncond={"class_labels": NULL})
    tr = diffusers_transitions(DDPMScheduler(), 5)
    with CallCounter(unet) as calls, pytest.raises(ValueError, match="class_labels") as e:
        SpeculativeSampler(model, tr, window=4).sample(
            4, (2, 8, 8), model_kwargs={"class_labels": torch.zeros(3, dtype=torch.long)}
        )
    one_line(e)
    assert calls.batches == []
