"""``torchrun --nproc_per_node 4 -m specdiff_kernels.cli.distributed ...``: multi-process sampling."""

import sys

from .commands import distributed_main

if __name__ == "__main__":
    sys.exit(distributed_main())
