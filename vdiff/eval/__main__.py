"""`python -m vdiff.eval`: the ShapesWorld eval job (see vdiff.eval.cli)."""

import sys

from vdiff.eval.cli import main

sys.exit(main())
