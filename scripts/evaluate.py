"""`python scripts/evaluate.py`: the `cbam-evaluate` command (`cbam_jax/cli/evaluate.py`), from a clone."""
import sys

from cbam_jax.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
