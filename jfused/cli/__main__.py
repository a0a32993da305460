"""`python -m jfused.cli`."""

import sys

from jfused.cli.commands import main

sys.exit(main())
