"""``python -m loadtests [--users 50 --spawn-rate 25 --time 20s --scenario MixUser]``: see :mod:`loadtests._runner`."""

import sys

from ._runner import main

sys.exit(main())
