"""`python -m app` runs the same CLI as the `gpusched` command."""

import sys

from app.cli import main

sys.exit(main())
