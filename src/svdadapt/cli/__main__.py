"""``python -m svdadapt.cli`` (and ``torchrun -m svdadapt.cli``): the ``svdadapt`` command."""

import sys

from .commands import main

sys.exit(main())
