"""`python -m nanlab.compare`: runs the clipping lab's command line (`nanlab.compare.cli`)."""

from nanlab import allocator

allocator.rerun_with_mimalloc()  # before JAX loads: the lab runs on mimalloc where installed

from nanlab.compare.cli import main  # noqa: E402

raise SystemExit(main())
