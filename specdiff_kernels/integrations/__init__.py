"""Adapters from other libraries' models and schedulers to specdiff_kernels' samplers."""
