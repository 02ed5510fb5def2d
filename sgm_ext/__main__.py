"""`python -m sgm_ext ...` is the `sgm-ext` command."""
import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while importing: one line, exit status 130
    from .core.pause import interrupted_at_start

    interrupted_at_start()

sys.exit(main())
