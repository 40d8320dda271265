"""`python -m tests.fuzz --seconds N --seed S` (a fuzz run) or `--replay FILE...`."""

from tests.fuzz.cli import main

raise SystemExit(main())
