"""``python -m otmf_exp.parity``: see :mod:`otmf_exp.parity.driver`."""

import sys

from otmf_exp.parity.driver import main

sys.exit(main())
