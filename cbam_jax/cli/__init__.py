"""The command lines: `cbam-train`, `cbam-evaluate`, `cbam-predict` and `cbam-export` (the
console scripts a pip install puts on PATH; `python scripts/<name>.py` in a clone runs the same
`main`). Each module's `main(argv=None) -> int` parses its flags and returns the exit status.

These modules sit above the library: they read a tutorial `.pth` through `parity` when torch is
installed, which no other module of `cbam_jax` imports.

What every command shares lives here, in the standard library only (so `--help` answers
without JAX), and `cbam-parity` (`parity/__main__.py`) uses it too: `command` wraps a `main`
so that bad input it reports as a `CommandError`, and an optional dependency that is not
installed, end in one `error:` line (the latter naming the `pip install "cbam-jax[...]"` that
provides it) instead of a traceback; `require` checks the dependencies a command needs before
it starts work; `check_out_dir` and `check_out_file` refuse an output path that a file or
folder is in the way of.
"""
import functools
import importlib.util
import sys
from pathlib import Path

from cbam_jax.recipe import debugging

# Top-level module -> the extra of cbam-jax that installs it (pyproject.toml's
# [project.optional-dependencies]); "" for the package's own dependencies.
EXTRA_OF = {
    "jax": "", "flax": "", "optax": "", "numpy": "",
    "tensorflow_datasets": "train", "tensorboardX": "train", "orbax": "train",
    "matplotlib": "train", "sklearn": "train", "tqdm": "train", "PIL": "train",
    "torch": "parity",
    "onnx": "export", "onnxscript": "export", "onnxruntime": "export",
    "tensorflow": "tfds-prepare",
}
TRAIN_MODULES = ("tensorflow_datasets", "tensorboardX", "orbax.checkpoint", "matplotlib",
                 "sklearn", "tqdm")  # what cbam-train imports from the train extra


class CommandError(Exception):
    """Bad input or a missing dependency: `command` prints the message as one `error:` line
    and the command exits 1."""


def install_hint(module: str, extra: str | None = None) -> str:
    """'... needs MODULE, which is not installed: pip install "cbam-jax[EXTRA]"'; `extra`
    overrides the extra that `EXTRA_OF` names (torch for ONNX export comes with 'export')."""
    top = module.partition(".")[0]
    extra = EXTRA_OF.get(top, "") if extra is None else extra
    package = f'"cbam-jax[{extra}]"' if extra else "cbam-jax"
    return f"this command needs {module}, which is not installed: pip install {package}"


def installed(module: str) -> bool:
    """Whether `module` can be imported, found without importing it (a dotted name imports
    its parent packages only)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package; a module set to None
        return False


def require(*modules: str, extra: str | None = None) -> None:
    """Raise CommandError with the install hint for the first of `modules` that is missing:
    a command calls it before it starts work, so nothing is half done when it stops."""
    for module in modules:
        if not installed(module):
            raise CommandError(install_hint(module, extra))


def checkpoint_modules(checkpoint) -> tuple[str, ...]:
    """What reading CHECKPOINT needs: torch for a tutorial `.pth`, orbax for a run's
    checkpoints."""
    return ("torch",) if Path(checkpoint).suffix == ".pth" else ("orbax.checkpoint",)


def _file_in_the_way(folder: Path) -> Path | None:
    """The file that `folder` or one of its parents is, if any (then no folder can be made)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # '.' or '/' at last
    return None if existing.is_dir() else existing


def check_out_dir(path, flag: str) -> Path:
    """`path` as a Path, if it is a folder or can be made one; else CommandError naming the file
    in the way. The folder itself is made only when something is written into it."""
    path = Path(path)
    blocking = _file_in_the_way(path)
    if blocking is not None:
        what = "a file" if blocking == path else f"{blocking} is a file"
        raise CommandError(f"{flag} {path}: {what}, not a folder")
    return path


def check_out_file(path, flag: str) -> Path:
    """`path` as a Path, if a file can be written there; else CommandError: it is a folder, or
    a file stands where one of its folders should be."""
    path = Path(path)
    if path.is_dir():
        raise CommandError(f"{flag} {path}: a folder; expected the name of the file to write")
    blocking = _file_in_the_way(path.parent)
    if blocking is not None:
        raise CommandError(f"{flag} {path}: {blocking} is a file, not a folder")
    return path


def command(main):
    """A command's `main(argv=None) -> int`, printing a CommandError, or an import of an
    optional dependency that is not installed (`EXTRA_OF`), as one `error:` line (exit 1)."""
    @functools.wraps(main)
    def run(argv=None) -> int:
        try:
            return main(argv)
        except CommandError as e:
            message = str(e)
        except ModuleNotFoundError as e:
            if (e.name or "").partition(".")[0] not in EXTRA_OF:
                raise  # not a dependency of cbam-jax: a bug, keep its traceback
            message = install_hint(e.name)
        print(f"error: {message}", file=sys.stderr)
        return 1
    return run


def error_exit(error: Exception, status: int = 1) -> int:
    """Report `error` as one line on stderr, 'error: ...', and return the exit `status`; raise
    it (its whole traceback) when the environment sets recipe.DEBUG_ENV."""
    if debugging():
        raise error
    print(f"error: {error}", file=sys.stderr)
    return status


def note_if_unverified(trained) -> None:
    """Say on stderr that a checkpoint was read without digests to check (one written before
    checkpoints carried them); `trained` is an inference.TrainedModel."""
    if trained.verified is False:
        from cbam_jax.checkpoint import unverified_note

        print(unverified_note(trained.source), file=sys.stderr)
