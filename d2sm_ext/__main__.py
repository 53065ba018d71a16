"""``python -m d2sm_ext demo`` — same as the ``d2sm`` console script."""
import sys

from .cli import main

sys.exit(main())
