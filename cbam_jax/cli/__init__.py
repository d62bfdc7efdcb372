"""The command lines: `cbam-train`, `cbam-evaluate`, `cbam-predict` and `cbam-export` (the
console scripts a pip install puts on PATH; `python scripts/<name>.py` in a clone runs the same
`main`). Each module's `main(argv=None) -> int` parses its flags and returns the exit status.

These modules sit above the library: they read a tutorial `.pth` through `parity` when torch is
installed, which no other module of `cbam_jax` imports.
"""
import sys

from cbam_jax.recipe import debugging


def error_exit(error: Exception) -> int:
    """Report `error` as one line on stderr, 'error: ...', and return the exit status 1; raise
    it (its whole traceback) when the environment sets recipe.DEBUG_ENV."""
    if debugging():
        raise error
    print(f"error: {error}", file=sys.stderr)
    return 1
