"""The seed tutorial's SimpleNet, trained correctly with normdrop's layers.

    python examples/seed_simplenet.py                      # the seed's settings: 10 epochs, lr 0.01
    python examples/seed_simplenet.py --epochs 300 --lr 0.1 --compare   # memorization, 4 variants

The code lives in ``normdrop.lab.seed`` (also ``normdrop seed`` on the command line); read it there.
"""

from normdrop.lab.seed import main

if __name__ == "__main__":
    raise SystemExit(main())
