"""`python -m fedsim`: see `fedsim.cli`."""

import sys

from fedsim.cli import main

sys.exit(main())
