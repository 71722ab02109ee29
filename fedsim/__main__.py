"""`python -m fedsim`: see `fedsim.cli`."""

import sys

import fedkernels
from fedsim.cli import main

# A process of its own: keep freed host memory for reuse (glibc), so the large per-round
# buffers (cohort updates, the residual stores) are not mapped and faulted in every round.
# Before the first JAX computation, as keep_host_memory asks.
fedkernels.host.keep_host_memory()
sys.exit(main())
