"""`python scripts/predict.py`: the `cbam-predict` command (`cbam_jax/cli/predict.py`), from a clone."""
import sys

from cbam_jax.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
