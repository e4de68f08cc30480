"""`python -m dlm.cli`: the dlm command line (what launchers like torchrun run)."""

import sys

from dlm.cli import main

sys.exit(main())
