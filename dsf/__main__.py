"""`python -m dsf <stage> ...`."""

import sys

from dsf.cli import main

sys.exit(main())
