"""Command-line argument types and the one-line parser, shared by ``specdiff`` (the cli layer) and
the training entry points of the models layer (below it: neither imports the other)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Optional

SEED_MAX = 2**63 - 1


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors on one line (``prog: error: message``, exit 2): the usage block
    it prints above them by default buries the message; ``--help`` still shows it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(low: int, what: str, high: Optional[int] = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
seed_int = _int_at_least(0, "an integer in 0..2^63-1", SEED_MAX)


def check_dir(option: str, path: str) -> Optional[str]:
    """The directory exists or can be made, and a file can be written in it (tried, since as root
    ``os.access`` says yes to read-only mounts)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        return f"argument {option}: {path!r} exists and is not a directory"
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as err:
        return f"argument {option}: cannot write to {path!r}: {err.strerror or err}"
    return None
