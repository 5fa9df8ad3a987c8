"""``python -m minismtp``: the same as the ``minismtp`` command."""

from minismtp.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
