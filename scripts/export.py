"""`python scripts/export.py`: the `cbam-export` command (`cbam_jax/cli/export.py`), from a clone."""
import sys

from cbam_jax.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
