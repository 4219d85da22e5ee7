"""The ``specdiff`` CLI and the embedded-model registry."""

from __future__ import annotations

import json
import os

import pytest
import torch
from preamble import cli_args, run_specdiff

from specdiff_kernels import SpeculativeSampler, models
from specdiff_kernels.cli.commands import main


def test_registry_loads_both_models():
    assert models.available() == ["digits", "digits-flow", "gmm", "pusht"]
    g = models.load("gmm", dim=5)
    assert g.event_shape == (5,) and g.draft is not None
    x = torch.randn(3, 5)
    t = torch.tensor([10, 500, 999])
    assert g.target(x, t).shape == (3, 5) and g.draft(x, t).shape == (3, 5)
    d = models.load("digits")
    assert d.event_shape == (1, 8, 8) and d.prediction == "epsilon" and d.clip_sample == 1.0
    assert d.target(torch.randn(2, 1, 8, 8), torch.tensor([3, 700])).shape == (2, 1, 8, 8)
    tr = d.transitions(50)
    assert tr.num_steps == 50 and int(tr.timesteps[0]) == 980
    assert models.load("gmm").transitions(20, "ddim", eta=1.0).num_steps == 20
    with pytest.raises(ValueError, match="unknown model"):
        models.load("imagenet")
    with pytest.raises(ValueError, match="sampler must be"):
        g.transitions(10, "heun")


def test_gmm_data_matches_its_moments():
    g = models.load("gmm", dim=3, seed=1)
    x = g.data(4000, torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(x.mean(0), g.target.gmm.mean(), atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), g.target.gmm.cov(), atol=0.1, rtol=0)


def test_demo_runs_and_reports(tmp_path, capsys):
    rc = main(cli_args("demo --model gmm --dim 8 --steps 40 --window 4 --batch 48", out=tmp_path))
    out = capsys.readouterr().out
    assert rc == 0
    assert "sequential target calls (batch)" in out and "acceptance by window position" in out
    assert "two-sample test" in out
    for name in ("demo_gmm_samples.png", "demo_gmm_acceptance.png", "demo_gmm_stats.json"):
        assert (tmp_path / name).stat().st_size > 1000
    stats = json.loads((tmp_path / "demo_gmm_stats.json").read_text())
    assert stats["speculative"]["target_calls"] < stats["ancestral"]["target_calls"]
    assert stats["two_sample_pvalue"] > 1e-3


def test_demo_with_draft_model_on_digits(tmp_path, capsys):
    rc = main(
        cli_args("demo --model digits --steps 20 --window 3 --draft model --batch 32", out=tmp_path)
    )
    out = capsys.readouterr().out
    assert rc == 0 and "digit classifier mean confidence" in out
    stats = json.loads((tmp_path / "demo_digits_stats.json").read_text())
    assert stats["speculative"]["draft_calls"] > 0


def test_info_and_module_entry_point():
    env = dict(os.environ, SPECDIFF_CPU_CAPABILITY="default")
    res = run_specdiff("info", timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert "backends: reference, cpp" in res.stdout and "C++ build:" in res.stdout
    assert "C++ kernels run the default variant" in res.stdout  # as the variable asked
    # the build line says what the build was compiled for, not "SIMD none" next to an avx512 line
    assert "SIMD none" not in res.stdout and "compiled for" in res.stdout
    from specdiff_kernels.ops import backends

    if backends.HAS_CPP and backends._C.supported_cpu_capability() != "default":
        assert "capped by SPECDIFF_CPU_CAPABILITY=default" in res.stdout


def test_info_lines_name_the_build_baseline_and_the_dispatched_variant(monkeypatch):
    """`specdiff info`: the build line names the instruction sets the build was compiled for (the
    x86-64 baseline without -m flags) and the next the variant the kernels dispatch to, with
    what this CPU supports and why a narrower one runs."""
    import platform

    from specdiff_kernels.cli.commands import _cpp_info_lines

    class Ext:
        def __init__(self, active, supported):
            self.active, self.supported = active, supported

        def cpu_capability(self):
            return self.active

        def supported_cpu_capability(self):
            return self.supported

    info = {"compiler": "12.2.0", "build_type": "Release", "cxx_flags": "-O3 ", "openmp": 201511}
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("SPECDIFF_CPU_CAPABILITY", raising=False)
    build, run = _cpp_info_lines({**info, "simd": []}, Ext("avx512", "avx512"))
    assert "compiled for x86-64 baseline (SSE2)" in build and "run time" in build
    assert run.startswith("C++ kernels run the avx512 variant") and "supports: avx512" in run
    build, _ = _cpp_info_lines({**info, "simd": ["avx", "avx2"]}, Ext("avx2", "avx2"))
    assert "compiled for avx/avx2" in build
    monkeypatch.setenv("SPECDIFF_CPU_CAPABILITY", "avx2")
    _, run = _cpp_info_lines({**info, "simd": []}, Ext("avx2", "avx512"))
    assert "run the avx2 variant" in run and "capped by SPECDIFF_CPU_CAPABILITY=avx2" in run
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    build, run = _cpp_info_lines({**info, "simd": ["neon"]}, Ext("default", "default"))
    assert "compiled for neon" in build and "run time" not in build
    assert run.startswith("C++ kernels run the default variant")


def test_demo_help_gives_each_models_defaults(capsys):
    """`specdiff demo --help` gives the per-model defaults the demo uses (digits runs 16 chains,
    not the gmm's 192)."""
    from specdiff_kernels.cli.commands import DEMO_DEFAULTS

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    batches = ", ".join(f"{m} {d['batch']}" for m, d in DEMO_DEFAULTS.items())
    assert batches == "digits 16, gmm 192, langevin 1000"
    assert f"chains per sampler (default: {batches})" in text
    assert "(default: gmm 64, langevin 4;" in text


@pytest.mark.parametrize("command", ["demo", "sample", "info"])
def test_every_command_has_a_description(command, capsys):
    from specdiff_kernels.cli.commands import build_parser

    sub = build_parser().subcommands[command]
    assert sub.description and len(sub.description) > 40
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert " ".join(sub.description.split()) in out


def test_digits_speculative_costs_less_than_ancestral():
    """The acceptance bar of the demo: digits, N=200, L=8, frozen-x0: <= 0.40 sequential calls."""
    m = models.load("digits")
    res = SpeculativeSampler(m.target, m.transitions(200), window=8).sample(
        16, m.event_shape, generator=torch.Generator().manual_seed(0)
    )
    assert res.stats.target_calls / 200 <= 0.40


def test_demo_without_matplotlib_and_sklearn(tmp_path, capsys, monkeypatch):
    """A plain install has neither: the demo says so in one line each, before sampling, and runs
    to the end (stats JSON written, no PNGs, no classifier line)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("matplotlib", "sklearn") else real(name, *a),
    )
    rc = main(cli_args("demo --model digits --steps 20 --window 3 --batch 16", out=tmp_path))
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[0] == (
        "note: matplotlib is not installed, so the PNG output is skipped "
        "(pip install 'specdiff_kernels[demo]' adds it)"
    )
    assert out[1] == (
        "note: sklearn is not installed, so the digit classifier is skipped "
        "(pip install 'specdiff_kernels[demo]' adds it)"
    )
    assert not any("digit classifier mean confidence" in line for line in out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_digits_stats.json"]


def test_langevin_demo_uses_backend_and_out(tmp_path, capsys, monkeypatch):
    """--backend and --out apply to --model langevin: the verify calls get the backend, and the
    stats land in --out."""
    from specdiff_kernels.ops import verify as ops

    seen = []
    real = ops.get_backend

    def spy(name, device):
        seen.append(name)
        return real(name, device)

    monkeypatch.setattr(ops, "get_backend", spy)
    rc = main(
        cli_args(
            "demo --model langevin --batch 64 --steps 20 --window 4 --dim 3 --backend reference",
            out=tmp_path,
        )
    )
    assert rc == 0 and "plain ULA" in capsys.readouterr().out
    assert len(seen) > 3 and set(seen) == {"reference"}
    stats = json.loads((tmp_path / "demo_langevin_stats.json").read_text())
    assert stats["args"]["backend"] == "reference" and stats["args"]["dim"] == 3
    assert [r["sampler"] for r in stats["rows"]] == [
        "plain ULA",
        "frozen gradient, L=4",
        "frozen gradient, adaptive",
        "surrogate gradient, L=4",
    ]
    assert all(r["two_sample_pvalue"] > 1e-3 for r in stats["rows"])


def test_demo_times_warm_interleaved_runs_on_the_threads_it_states(tmp_path, capsys):
    """The printed wall ratio is a ratio of medians of warm interleaved runs, on the thread count
    the header states; the caller's thread count comes back after."""
    before = torch.get_num_threads()
    rc = main(
        cli_args(
            "demo --model gmm --dim 8 --steps 30 --batch 24 --reps 3 --threads 1", out=tmp_path
        )
    )
    out = capsys.readouterr().out
    assert rc == 0 and torch.get_num_threads() == before
    assert "1 CPU thread" in out and "median of 3 warm runs" in out and "first runs:" in out
    warm = json.loads((tmp_path / "demo_gmm_stats.json").read_text())["warm_wall_time_s"]
    assert len(warm["ancestral"]) == len(warm["speculative"]) == 3 and warm["threads"] == 1
    assert all(t > 0 for t in warm["ancestral"] + warm["speculative"])


def test_demo_reps_does_not_apply_to_langevin(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--model", "langevin", "--reps", "3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--reps" in err[0] and "langevin" in err[0]


def test_acceptance_line_of_a_run_without_windows_says_so():
    from specdiff_kernels.cli.demo import acceptance_line
    from specdiff_kernels.sampling.accounting import SamplerStats

    st = SamplerStats("speculative", 4, 10, 32)
    st.accepted_by_position, st.attempted_by_position = [0] * 32, [0] * 32
    assert acceptance_line(st).endswith("no window was verified (every step ancestral)")
    st.accepted_by_position[:3], st.attempted_by_position[:3] = [4, 3, 1], [4, 4, 2]
    assert acceptance_line(st) == "acceptance by window position: 0:1.00  1:0.75  2:0.50"
