"""`python -m adaptc`: the adaptc command where the console script is not on PATH (a venv
that is not activated)."""
import sys

from adaptc.cli import main

sys.exit(main())
