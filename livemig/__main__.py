"""``python -m livemig``: the same as the ``livemig`` command."""

import sys

from livemig.cli import main

sys.exit(main())
