"""Command line: `python -m training {index,synth,...}`."""
from training.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
