#!/usr/bin/env python
"""SpecDec++ benchmark: see training/specdec/bench.py (also ``python -m training.specdec bench``).

    python benchmarks/specdec.py --n-alpaca 8 --n-ood 3 --max-new 64
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's offline tooling (training/)

from training.specdec.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
