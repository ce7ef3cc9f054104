"""`python -m nanlab.compare`: runs the clipping lab's command line (`nanlab.compare.cli`)."""

from nanlab.compare.cli import main

raise SystemExit(main())
