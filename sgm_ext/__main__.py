"""`python -m sgm_ext ...` is the `sgm-ext` command."""
import sys

from .cli import main

sys.exit(main())
