"""The tutorial's recipe, written once: every setting's name, default, check and help text.

`TrainConfig` (what `cbam_jax.train.fit` runs) and the flags of `scripts/train.py` are both
built from the fields below, so a default or a check cannot drift between them. This module
imports only the standard library: `python scripts/train.py --help` answers without JAX.
"""
import argparse
import dataclasses
import math
import os
from typing import Any, Callable

from cbam_jax.registry import MODEL_NAMES

DATASETS = ("auto", "cifar10", "digits", "folder")
DTYPES = ("float32", "bfloat16")  # compute dtypes; cbam_jax.train maps them to jnp dtypes
DEFAULT_RUN_DIR = "runs/CBAM_CNN_experiment"  # the tutorial's, suffixed _1, _2, ... when taken
DEFAULT_DATA_DIR = "./data"  # where CIFAR-10 is looked for and downloaded
RUN_RECORD = "run.json"  # a run's settings, written when it starts: what --resume continues
DEBUG_ENV = "CBAM_JAX_DEBUG"  # set to 1: tracebacks and orbax's own reports, not one error line
DEBUG_HELP = (f"An error is one line starting 'error:' and a non-zero exit status; {DEBUG_ENV}=1 "
              f"in the environment shows the full traceback (and orbax's own reports) instead.")


def debugging() -> bool:
    """Whether the environment asks for full tracebacks (DEBUG_ENV set, not to 0)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


@dataclasses.dataclass(frozen=True)
class Check:
    """A value's rule: `convert` a command-line string, then `ok(value)`; `expected` says what
    is wanted, in the error that both the config and the command line give."""

    convert: Callable[[str], Any]
    ok: Callable[[Any], bool]
    expected: str
    choices: tuple[str, ...] | None = None  # argparse lists these in --help and its errors

    def __call__(self, name: str, value) -> None:
        if not self.ok(value):
            raise ValueError(f"{name}: expected {self.expected}, got {value!r}")

    def parse(self, text: str):
        """An argparse `type`: the converted value, or argparse's own error."""
        try:
            value = self.convert(text)
        except ValueError:
            value = None
        if value is None or not self.ok(value):
            raise argparse.ArgumentTypeError(f"expected {self.expected}, got {text!r}")
        return value


POSITIVE_INT = Check(int, lambda v: isinstance(v, int) and v >= 1, "a positive integer")
NON_NEGATIVE_INT = Check(int, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
POSITIVE_FLOAT = Check(float, lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v > 0,
                       "a positive finite number")


def one_of(choices: tuple[str, ...]) -> Check:
    return Check(str, lambda v: v in choices, f"one of {', '.join(choices)}", choices)


def setting(default, check: Check, help: str, *, flag: str | None = "", optional=False):
    """A TrainConfig field: its default, its check, its help; `flag` '' derives `--the-name`,
    None keeps it off the command line. `optional`: None is allowed (it means 'automatic')."""
    return dataclasses.field(default=default, metadata=dict(check=check, help=help, flag=flag,
                                                            optional=optional))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The tutorial's recipe by default; the cadences are the tutorial's TensorBoard ones."""

    epochs: int = setting(50, POSITIVE_INT, "number of training epochs")
    batch_size: int = setting(
        64, POSITIVE_INT, "training and evaluation batch size: the global batch, split evenly "
        "over all devices of all processes (which must divide it)")
    learning_rate: float = setting(
        1e-3, POSITIVE_FLOAT, "initial Adam learning rate (halved by ReduceLROnPlateau on the "
        "test loss after 4 epochs without improvement)", flag="--lr")
    seed: int = setting(0, NON_NEGATIVE_INT,
                        "seed of the initial weights, shuffling, augmentation and dropout")
    model: str = setting("cbam_cnn", one_of(MODEL_NAMES),
                         "the tutorial's CBAM CNN, or a CBAM-ResNet (CIFAR stem, official CBAM)")
    dtype: str = setting("float32", one_of(DTYPES),
                         "compute dtype of the model; parameters, optimizer, loss and BatchNorm "
                         "statistics stay float32")
    steps_per_call: int | None = setting(
        None, POSITIVE_INT, "training steps per compiled call (default: 1 on CPU; 50 on GPU/TPU, "
        "in a rolled loop that amortises dispatch; more than 1 on CPU runs that loop too, which "
        "XLA:CPU runs slower)", optional=True)
    log_every: int = setting(100, POSITIVE_INT,
                             "batches between Train/Batch_* scalars and progress updates")
    hist_every: int = setting(500, POSITIVE_INT,
                              "batches between weight and gradient histograms")
    num_attention_images: int = setting(8, POSITIVE_INT,
                                        "test images whose attention maps are logged", flag=None)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (value is None and field.metadata["optional"]):
                field.metadata["check"](field.name, value)


# Settings whose change would make a resumed run differ from an uninterrupted one: the numbers
# (batch, learning rate, seed, dtype, model) and the compiled calls that compute them (steps per
# call; the cadences, whose histogram batches split an epoch's calls). `epochs` may only grow.
RESUME_KEYS = ("batch_size", "learning_rate", "seed", "dtype", "model", "steps_per_call",
               "log_every", "hist_every")


def cadence_in_epoch(every: int, num_batches: int) -> int:
    """Batches between two records of a per-batch cadence (`log_every`, `hist_every`), counted
    within the epoch as the tutorial counts them: the cadence itself, or the epoch's length when
    an epoch has fewer batches, so that every epoch records at least its last batch. CIFAR-10's
    782 batches of 64 keep the tutorial's 100 and 500."""
    return min(every, num_batches)


def flag_of(name: str) -> str:
    """The command-line flag of a setting: a TrainConfig field's (`--lr` for learning_rate),
    else `--the-name`."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    return (name in fields and fields[name].metadata["flag"]) or "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (those with a flag), with its default, check and help.
    Each help text states its default once (`%(default)s`, or in words where None means
    automatic): use argparse's plain HelpFormatter, which adds none of its own."""
    for field in dataclasses.fields(TrainConfig):
        if field.metadata["flag"] is None:
            continue
        check: Check = field.metadata["check"]
        kwargs = dict(choices=check.choices) if check.choices else dict(type=check.parse)
        default = "" if field.default is None else " (default: %(default)s)"
        parser.add_argument(flag_of(field.name), dest=field.name, default=field.default,
                            help=field.metadata["help"] + default, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig that `add_config_flags`'s flags describe."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                          if f.metadata["flag"] is not None})


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    """How the scripts that use a trained model (evaluate, predict, export) name it: CHECKPOINT,
    --which and --dataset, the arguments of `cbam_jax.inference.load_checkpoint`. The help
    texts state their defaults (for argparse's plain HelpFormatter)."""
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a run directory, its checkpoints/ (or best/, latest/, one step "
                             "directory in them), or a tutorial .pth (needs torch)")
    parser.add_argument("--which", choices=("best", "latest"), default="best",
                        help="which checkpoint of a run directory: the best test accuracy, or "
                             "the last epoch (default: %(default)s)")
    parser.add_argument("--dataset", choices=[d for d in DATASETS if d != "auto"], default=None,
                        help="for a .pth outside a run directory: the data set it was trained "
                             "on; none given: cifar10, the tutorial's")
