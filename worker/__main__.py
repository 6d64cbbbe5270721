"""Run the command line: ``python -m worker``."""

from worker.ops.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
