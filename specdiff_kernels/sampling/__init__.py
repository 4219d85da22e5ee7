"""The sampling layer: Gaussian transition families, counter-based chain noise, drafts, window
control, the static and ragged speculative rounds, the samplers, Langevin and multi-process
sampling. It calls the ops layer (:mod:`specdiff_kernels.ops`), never the kernels directly."""
