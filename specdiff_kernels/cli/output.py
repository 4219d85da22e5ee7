"""``--out``: one run's files per folder, nothing half-written left behind.

A folder that already holds files a ``specdiff`` command writes (:data:`RUN_FILES`, from any
command, this version or an earlier one) is refused unless ``--overwrite``; with it, exactly those
files are removed before the new ones are written, so the folder never mixes two runs. Files of
other names (the user's own) are never touched. The folder is made only when the results are
written, and a run interrupted or failing while writing removes the files it wrote and the
folders it made.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

DEMO_MODELS = ("digits", "gmm", "langevin")


def sample_files() -> tuple[str, ...]:
    return ("samples.png", "samples_ancestral.png", "stats.json")


def demo_files(model: str) -> tuple[str, ...]:
    if model == "langevin":
        return ("demo_langevin_stats.json",)
    return tuple(f"demo_{model}_{part}" for part in ("samples.png", "acceptance.png", "stats.json"))


def policy_files() -> tuple[str, ...]:
    return ("policy_pusht.json", "policy_pusht.png")


# every name a specdiff command writes; the last four: the demos' names in earlier versions
RUN_FILES = (
    *sample_files(),
    *(name for model in DEMO_MODELS for name in demo_files(model)),
    *policy_files(),
    "demo_samples.png",
    "demo_acceptance.png",
    "demo_stats.json",
    "langevin_stats.json",
)


def _writable(option: str, folder: Path, path: str) -> Optional[str]:
    # tried, not os.access: as root, os.access says yes to read-only mounts
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        return f"argument {option}: cannot write to {path!r}: {err.strerror or err}"
    return None


def check_out(option: str, path: str, overwrite: bool) -> Optional[str]:
    """The error for ``--out`` (nothing is created): not a folder, not writable, or holding
    another run's files without ``--overwrite``."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        return f"argument {option}: {path!r} exists and is not a directory"
    if not p.exists():
        parent = p.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            return f"argument {option}: cannot make {path!r}: {str(parent)!r} is not a directory"
        return _writable(option, parent, path)
    err = _writable(option, p, path)
    if err:
        return err
    previous = [name for name in RUN_FILES if (p / name).is_file()]
    if previous and not overwrite:
        return (
            f"argument {option}: {path!r} holds the files of another run "
            f"({', '.join(previous)}); pass --overwrite to replace them (other files are kept), "
            f"or choose another {option}"
        )
    return None


class RunOutput:
    """``with RunOutput(out, overwrite) as o: o.path("stats.json").write_text(...)``: makes the
    folder, with ``overwrite`` clears the previous run's files (:func:`check_out` refused them
    without it), and on an exception or Ctrl-C inside
    the block removes the files it handed out and the folders it made."""

    def __init__(self, folder: str, overwrite: bool = False):
        self.folder = Path(folder)
        self.overwrite = overwrite
        self.written: list[Path] = []
        self.made: list[Path] = []

    def __enter__(self) -> "RunOutput":
        p = self.folder
        while not p.exists():
            self.made.append(p)  # deepest first: the order to remove them in
            p = p.parent
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.overwrite:
            for name in RUN_FILES:
                (self.folder / name).unlink(missing_ok=True)
        return self

    def path(self, name: str) -> Path:
        p = self.folder / name
        self.written.append(p)
        return p

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            for p in self.written:
                p.unlink(missing_ok=True)
            for d in self.made:
                try:
                    d.rmdir()
                except OSError:  # not empty: something else is in it
                    break
        return False
