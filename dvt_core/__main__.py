"""``python -m dvt_core``: the same as the ``dvt`` console script."""
import sys

from dvt_core.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
