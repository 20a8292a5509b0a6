"""``python -m archon_server.search run|export|status ...`` (the same commands as ``archon search``)."""

from archon_server.search.cli import main

raise SystemExit(main())
