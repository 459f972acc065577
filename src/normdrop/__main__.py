"""``python -m normdrop``: the same as the ``normdrop`` command."""

from normdrop.cli import main

if __name__ == "__main__":  # spawned worker processes import this module too
    raise SystemExit(main())
