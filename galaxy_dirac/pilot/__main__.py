"""``python -m galaxy_dirac.pilot``: run the pilot."""

import sys

from galaxy_dirac.pilot.pilot import main

sys.exit(main())
