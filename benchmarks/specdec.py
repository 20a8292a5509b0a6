#!/usr/bin/env python
"""SpecDec++ benchmark: see archon_server/engine/specdec/bench.py.

    python benchmarks/specdec.py --n-alpaca 8 --n-ood 3 --max-new 64
"""

from archon_server.engine.specdec.bench import main

if __name__ == "__main__":
    main()
