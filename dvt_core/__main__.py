"""``python -m dvt_core``: the same as the ``dvt`` console script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
