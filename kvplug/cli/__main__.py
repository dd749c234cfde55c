"""`python -m kvplug.cli ...`, the same as the `kvplug` console script."""
import sys

from kvplug.cli.main import main

if __name__ == "__main__":  # the layering test imports every module: importing must not run it
    sys.exit(main())
