"""`python -m bloomrun.cli` is `bloomctl`."""

import sys

from bloomrun.cli.main import main

sys.exit(main())
