"""``python -m chatnode``: the same as the ``chatnode`` command."""

import sys

from chatnode.cli import main

sys.exit(main())
