"""``python -m normdrop.repro``: same as ``normdrop repro``."""

from normdrop.repro import main

if __name__ == "__main__":  # spawned workers import this module again: run only once
    main()
