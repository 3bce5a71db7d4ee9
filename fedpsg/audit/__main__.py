"""``python -m fedpsg.audit``: see :mod:`fedpsg.audit.cli`."""

import sys

from fedpsg.audit.cli import main

sys.exit(main())
