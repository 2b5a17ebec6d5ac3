"""``python -m pipeline`` is the ``tasknotes`` command."""

from pipeline.cli import main

raise SystemExit(main())
