"""The ``specdiff`` command: ``info``, ``demo``, ``sample`` (:mod:`.commands`), the demos (:mod:`.demo`),
``specdiff sample`` (:mod:`.sample`) and the torchrun entry point (:mod:`.distributed`)."""

from .commands import main

__all__ = ["main"]
