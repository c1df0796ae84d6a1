"""`python -m cofx` runs the command line, like the installed `cofx` script."""
import sys

from .cli import main

sys.exit(main())
