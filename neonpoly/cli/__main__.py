"""`python -m neonpoly.cli …` runs the command line (the tests and benchmarks start serve so)."""

import sys

from neonpoly.cli.main import main

sys.exit(main())
