"""Helpers of the argument-check tests (python_tests/arguments/ and the CLI tests): every refusal
is ONE line that names the argument, and comes before any work (a call counter)."""

from __future__ import annotations

import functools

import pytest
import torch


def one_line(err: pytest.ExceptionInfo) -> str:
    """The error's message, which must be one non-empty line."""
    text = str(err.value)
    assert text and "\n" not in text, f"not one line: {text!r}"
    return text


def check(call, exc, name) -> None:
    """``call()`` raises exactly ``exc`` in one line that names ``name``."""
    with pytest.raises(exc) as err:
        call()
    msg = one_line(err)
    assert type(err.value) is exc, f"{type(err.value).__name__}: {msg}"
    assert name in msg, f"does not name {name!r}: {msg!r}"


def vary(prefix: str, call, name: str, **values) -> dict:
    """Cases ``{prefix}_{suffix}`` of a table for :func:`check`: ``call(value)`` raises ``exc``
    naming ``name``, for each ``suffix=(value, exc)``."""
    return {
        f"{prefix}_{suffix}": (functools.partial(call, value), exc, name)
        for suffix, (value, exc) in values.items()
    }


def bad_steps(prefix: str, builder, name: str = "num_inference_steps") -> dict:
    """Cases ``{prefix}_{suffix}``: the step counts a new user tries, for ``builder(n)`` (1000
    training steps)."""
    return vary(
        prefix,
        builder,
        name,
        **{"0": (0, ValueError)},
        neg=(-3, ValueError),
        float=(2.5, TypeError),
        bool=(True, TypeError),
        str=("50", TypeError),
        over_T=(1001, ValueError),
    )


def cli_error(argv, capsys, entry=None) -> str:
    """The last stderr line of a command that fails as an argument error: exit 2, nothing on
    stdout, no traceback, at most argparse's usage above it."""
    if entry is None:
        from specdiff_kernels.cli.commands import main as entry
    with pytest.raises(SystemExit) as exc:
        entry(argv)
    captured = capsys.readouterr()
    assert exc.value.code == 2
    assert captured.out == ""
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert lines and ": error: " in lines[-1]
    assert all(line.startswith(("usage:", " ")) for line in lines[:-1])  # argparse's usage only
    return lines[-1]


class CallCounter:
    """Counts the forward calls of a torch module (a refusal must come before the first)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, *args) -> None:
        self.calls += 1
