"""The command lines: `cbam-train`, `cbam-evaluate`, `cbam-predict` and `cbam-export` (the
console scripts a pip install puts on PATH; `python scripts/<name>.py` in a clone runs the same
`main`). Each module's `main(argv=None) -> int` parses its flags and returns the exit status.

These modules sit above the library: they read a tutorial `.pth` through `parity` when torch is
installed, which no other module of `cbam_jax` imports.
"""
