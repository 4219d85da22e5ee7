"""Adapters from other libraries' models and schedulers to specdiff_kernels' samplers."""

from .pipeline import SpeculativePipeline

__all__ = ["SpeculativePipeline"]
