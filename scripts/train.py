"""`python scripts/train.py`: the `cbam-train` command (`cbam_jax/cli/train.py`), from a clone."""
import sys

from cbam_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
