"""``python -m training.specdec ...``: see :mod:`training.specdec.cli`."""

from .cli import main

raise SystemExit(main())
