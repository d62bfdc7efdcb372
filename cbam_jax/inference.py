"""Use a trained model: load a checkpoint, predict top-k classes, read CBAM's attention maps,
export the eval-mode model as StableHLO.

    trained = load_checkpoint("runs/CBAM_CNN_experiment")       # checkpoints/best of a run
    result = predict(trained.state, images, top_k=3)            # images: uint8 [n, 32, 32, 3]
    maps = attention_maps(trained.state, images)                # [n, 16, 16], [n, 8, 8], ...

The functions take a model's eval state: anything with Linen's `apply_fn`, `params` and
`batch_stats`, i.e. the `InferenceState` of `load_checkpoint` or the `TrainState` of
`cbam_jax.train.fit`. How a model is called lives in one place, `apply_eval`: another model
family (flax.nnx) is one more branch there, and no caller changes. `scripts/evaluate.py`,
`predict.py` and `export.py` are the command lines over this module; a tutorial `.pth` loads
through `parity.load_checkpoint`, which needs torch.
"""
import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cbam_jax import distributed
from cbam_jax.augment import check_images, normalize
from cbam_jax.data import CIFAR10_NORMALIZATION, CLASS_NAMES, IMAGE_SHAPE, Normalization
from cbam_jax.folder import IMAGE_SUFFIXES, load_image  # noqa: F401 (how prediction reads files)
from cbam_jax.loader import pad_to_batches
from cbam_jax.recipe import RUN_RECORD, TrainConfig
from cbam_jax.registry import create_model
from cbam_jax.rundir import read_record

DEFAULT_BATCH_SIZE = 64  # the tutorial's; the batch size changes the speed, not the answers


@flax.struct.dataclass
class InferenceState:
    """A model in eval mode: how to apply it, its variables, and the Normalize its inputs get.
    `TrainState` has the same four fields, so every function here takes either."""

    apply_fn: Callable = flax.struct.field(pytree_node=False)
    params: Any
    batch_stats: Any
    normalization: Normalization = flax.struct.field(pytree_node=False,
                                                     default=CIFAR10_NORMALIZATION)


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A checkpoint loaded for inference, and what its run recorded about it."""

    state: InferenceState
    config: TrainConfig         # the run's settings: model, dtype, batch size, ...
    dataset: str                # the data set it was trained on: 'cifar10', 'digits', 'folder'
    source: Path                # the step directory or .pth file it was read from
    epoch: int | None = None    # the epoch that wrote it (None: not recorded, e.g. a .pth)
    devices: int | None = None  # how many devices the run split each batch over (None: unknown)
    recorded: Mapping | None = None  # that epoch's {'test_loss', 'test_acc'}, as the run logged
    verified: bool | None = None  # checked against its SHA256SUMS (False: a checkpoint from
    #                               before checkpoints carried digests; None: not a checkpoint)
    data: Mapping | None = None   # what the run recorded of its data (`Dataset.description`)

    @property
    def class_names(self) -> tuple[str, ...]:
        if self.data is not None:
            return tuple(self.data["class_names"])
        return CLASS_NAMES[self.dataset]

    @property
    def image_size(self) -> int:
        """The side of the square images the model takes."""
        return image_size_of(self.data)


def image_size_of(data: Mapping | None) -> int:
    """The image size a run's data description records (the recipe's 32 without one)."""
    return int((data or {}).get("image_size", IMAGE_SHAPE[0]))


def normalization_of(data: Mapping | None) -> Normalization:
    """The Normalize a run's data description records (CIFAR-10's without one)."""
    if not data or "mean" not in data:
        return CIFAR10_NORMALIZATION
    return Normalization(tuple(data["mean"]), tuple(data["std"]))


# --- loading ---------------------------------------------------------------------------------

def find_run_dir(path) -> Path | None:
    """The run directory (the folder with `run.json`) that `path` belongs to: the run
    directory itself, a checkpoint in it, or a file in it; None if there is none."""
    path = Path(path).absolute()
    folder = path if path.is_dir() else path.parent
    return next((p for p in (folder, *list(folder.parents)[:3])  # run/checkpoints/best/<step>
                 if (p / RUN_RECORD).is_file()), None)


def read_run_record(path) -> dict | None:
    """The `run.json` of the run that `path` belongs to (`find_run_dir`), or None. Plain JSON:
    no JAX backend starts, so a CPU device count can still be set from it."""
    run_dir = find_run_dir(path)
    return None if run_dir is None else read_record(run_dir)


def config_of(record: Mapping | None) -> TrainConfig:
    """The TrainConfig of a run record or checkpoint record (its 'config'); the recipe's
    defaults without one. Settings this version does not know are ignored."""
    saved = (record or {}).get("config", {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


def load_checkpoint(path, *, which: str = "best", mesh=None, dtype: str | None = None,
                    dataset: str | None = None) -> TrainedModel:
    """The model of an orbax checkpoint written by `cbam_jax.train.fit`, ready for inference.

    `path`: a run directory or its `checkpoints/` (`which`: 'best' or 'latest'), a `best/` or
    `latest/` directory (its newest step), or a step directory. The checkpoint's record names
    the model, its compute dtype (`dtype` overrides it) and its data set (a `dataset` given,
    as for a `.pth` in `parity.load_checkpoint`, must be that one). Only the variables are
    read; they are placed on every device of `mesh`, else on the default device.

    The checkpoint is checked against its digests first (`cbam_jax.checkpoint.verify`): a
    damaged one, or one whose parameters are not finite, is a DamagedCheckpointError (a
    ValueError) naming the file; the other of best/latest is never taken silently.
    """
    from cbam_jax.checkpoint import read_meta, restore_variables, step_directory, verify  # orbax

    if Path(path).suffix == ".pth":
        raise ValueError(f"{path} is a PyTorch state_dict: load it with parity.load_checkpoint, "
                         f"which needs torch (pip install 'cbam-jax[parity]')")
    step_dir = step_directory(path, which)
    verified = verify(step_dir)
    meta = read_meta(step_dir)
    if dataset is not None and dataset != meta["dataset"]:
        raise ValueError(f"{step_dir} was trained on {meta['dataset']}, not {dataset}")
    config, dataset, data = config_of(meta), meta["dataset"], meta.get("data")
    model = model_of(config, dataset, dtype, data)
    size = image_size_of(data)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jnp.zeros((1, size, size, 3), jnp.float32))
    sharding = (distributed.replicated(mesh) if mesh is not None
                else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    target = {collection: jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes[collection])
        for collection in ("params", "batch_stats")}
    variables = restore_variables(step_dir, target)
    history = meta["history"]
    return TrainedModel(
        InferenceState(model.apply, variables["params"], variables["batch_stats"],
                       normalization_of(data)), config,
        dataset, step_dir, epoch=meta["epoch"], devices=meta.get("devices"),
        recorded={"test_loss": history["test_loss"][-1], "test_acc": history["test_acc"][-1]},
        verified=verified, data=data)


def model_of(config: TrainConfig, dataset: str, dtype: str | None = None,
             data: Mapping | None = None):
    """The Linen model a run trained: `config.model` for the data set's classes (those `data`
    records, else the named set's) at its image size, computing in `dtype` (default
    `config.dtype`); jnp's dtype of that name, as `cbam_jax.train.build`."""
    if data is not None:
        classes = data["class_names"]
    elif dataset in CLASS_NAMES:
        classes = CLASS_NAMES[dataset]
    else:
        raise ValueError(f"unknown data set {dataset!r}: expected one of "
                         f"{', '.join(CLASS_NAMES)}")
    return create_model(config.model, len(classes), getattr(jnp, dtype or config.dtype),
                        image_size=image_size_of(data))


def from_variables(variables: Mapping, *, config: TrainConfig, dataset: str, source,
                   mesh=None, dtype: str | None = None,
                   devices: int | None = None) -> TrainedModel:
    """A TrainedModel of variables ({'params', 'batch_stats'}) read elsewhere, e.g. from a
    `.pth` by `parity.load_checkpoint`; placed as `load_checkpoint` places them."""
    model = model_of(config, dataset, dtype)
    variables = (distributed.put_replicated(dict(variables), mesh) if mesh is not None
                 else jax.device_put(dict(variables)))
    return TrainedModel(InferenceState(model.apply, variables["params"],
                                       variables["batch_stats"]),
                        config, dataset, Path(source), devices=devices)


# --- the eval-mode forward -------------------------------------------------------------------

def apply_eval(state, x):
    """Eval-mode logits [B, K] and the sown intermediates of normalised images x [B, 32, 32, 3].

    The one place that knows how a model is called: Linen's `apply_fn` with its variables.
    A flax.nnx model would be one more branch here (its sown values are `nnx.Intermediate`s).
    """
    return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x,
                          train=False, mutable=["intermediates"])


def spatial_gates(intermediates) -> list:
    """Every CBAM spatial gate sown in `intermediates` (as 'spatial_attention', [B, H, W, 1]),
    in the order the blocks ran, as [B, H, W]. Found by name, so any CBAM model has them."""
    gates = []

    def walk(node):
        for name, value in node.items():  # Flax keeps the order in which modules sowed
            if name == "spatial_attention":
                gates.extend(gate[..., 0] for gate in value)  # sow appends to a tuple
            elif isinstance(value, Mapping):
                walk(value)

    walk(intermediates)
    return gates


@jax.jit
def eval_logits(state, x):
    """Eval-mode logits [B, K] (float32) of normalised images x [B, 32, 32, 3]."""
    return apply_eval(state, x)[0]


@jax.jit
def attention_maps(state, images) -> list:
    """Each CBAM block's spatial gate in eval mode, for uint8 images [n, 32, 32, 3]:
    CBAMCNN's [n, 16, 16], [n, 8, 8], [n, 4, 4]."""
    return spatial_gates(apply_eval(state, normalize(images, state.normalization))[1])


# --- Grad-CAM --------------------------------------------------------------------------------

def cbam_layers(state, image_size: int = IMAGE_SHAPE[0]) -> list[str]:
    """The module paths of a model's CBAM blocks, in the order they run ('cbam1', ...,
    'layer4_1/cbam'): the layers `gradcam` can explain."""
    from cbam_jax.layers import CBAM

    paths = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, CBAM) and context.method_name == "__call__":
            paths.append("/".join(context.module.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):  # a new function: a cached trace would call no module
        jax.eval_shape(lambda s, x: apply_eval(s, x), state,
                       jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
    return list(dict.fromkeys(paths))


def _apply_with_delta(state, x, layer: str, delta):
    """Eval-mode logits, with `delta` added to the output of the module at path `layer`, and
    that module's output: differentiating by `delta` differentiates by the output."""
    outputs = []

    def add_delta(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and "/".join(context.module.path) == layer:
            outputs.append(out)
            out = out + delta if delta is not None else out
        return out

    with nn.intercept_methods(add_delta):
        logits = apply_eval(state, x)[0]
    if not outputs:
        raise ValueError(f"layer {layer!r}: the model has no module at that path")
    return logits, outputs[0]


@functools.partial(jax.jit, static_argnames=("layer",))
def _gradcam(state, images, target, *, layer: str):
    x = normalize(images, state.normalization)
    activation = jax.eval_shape(lambda: _apply_with_delta(state, x, layer, None)[1])

    def score(delta):
        logits, out = _apply_with_delta(state, x, layer, delta)
        classes = jnp.where(target < 0, jnp.argmax(jax.lax.stop_gradient(logits), -1), target)
        picked = jnp.take_along_axis(logits, classes[:, None], axis=-1)
        return picked.sum(), (out, classes)  # images are independent in eval mode

    grads, (out, classes) = jax.grad(score, has_aux=True)(
        jnp.zeros(activation.shape, activation.dtype))
    grads, out = grads.astype(jnp.float32), out.astype(jnp.float32)
    weights = grads.mean(axis=(1, 2), keepdims=True)                # [n, 1, 1, C]
    cam = jax.nn.relu((weights * out).sum(axis=-1))                 # [n, h, w]
    cam = jax.image.resize(cam, (cam.shape[0], *images.shape[1:3]), "bilinear")
    peak = cam.max(axis=(1, 2), keepdims=True)
    return jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1), 0.0), classes


def gradcam(state, images, *, target: int | None = None, layer: str | None = None):
    """Grad-CAM (Selvaraju et al., 2017), as the CBAM paper shows its models (Woo et al., 2018,
    Figure 4): where the evidence for a class lies in uint8 images [n, S, S, 3].

    The gradients of the class's logit by the output of `layer` (a module path, see
    `cbam_layers`; default: the last CBAM block), averaged over its pixels, weight its
    channels; their weighted sum, through a ReLU, is upsampled bilinearly to SxS and scaled
    to a peak of 1 (all zeros where nothing speaks for the class). `target`: a class index
    for every image, or None for each image's predicted class. Returns (maps float32
    [n, S, S] in [0, 1], the explained classes int32 [n]).
    """
    images = np.asarray(images)
    check_images(images)
    if layer is None:
        layers = cbam_layers(state, images.shape[1])
        if not layers:
            raise ValueError("the model has no CBAM block: name a layer to explain")
        layer = layers[-1]
    target = np.full(len(images), -1 if target is None else target, np.int32)
    maps, classes = _gradcam(state, images, target, layer=layer)
    return np.asarray(maps), np.asarray(classes)


class Prediction(NamedTuple):
    classes: np.ndarray          # int32 [n, k]: the k most probable classes, most probable first
    probabilities: np.ndarray    # float32 [n, k]: their softmax probabilities
    attention: list              # each CBAM block's spatial gate, float32 [n, h, w]; [] unasked


@functools.partial(jax.jit, static_argnames=("top_k", "with_attention"))
def predict_batch(state, images, *, top_k: int, with_attention: bool):
    """One compiled eval-mode step on uint8 images [B, 32, 32, 3]: (classes, probabilities,
    spatial gates or [])."""
    logits, intermediates = apply_eval(state, normalize(images, state.normalization))
    if top_k > logits.shape[-1]:  # shapes are known while tracing: fail before compiling
        raise ValueError(f"top_k: expected 1 to {logits.shape[-1]} (the model's classes), "
                         f"got {top_k}")
    probabilities, classes = jax.lax.top_k(jax.nn.softmax(logits), top_k)
    return classes, probabilities, spatial_gates(intermediates) if with_attention else []


def predict(state, images, *, top_k: int = 3, batch_size: int = DEFAULT_BATCH_SIZE,
            attention: bool = False) -> Prediction:
    """The top-k classes and probabilities of uint8 images [n, 32, 32, 3] (as the data sets
    hold them: the test transform is applied here), `batch_size` at a time; with `attention`,
    each CBAM block's spatial gate too.

    The last batch is padded, so one shape compiles for any n; eval mode uses running
    statistics, so the padding cannot change the real rows. Batches are dispatched without
    waiting, and read back once at the end.
    """
    images = np.asarray(images)
    check_images(images)
    for name, value in (("top_k", top_k), ("batch_size", batch_size)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    n = len(images)
    padded, _, _ = pad_to_batches(images, np.zeros(n, np.int32), batch_size)
    outputs = jax.device_get([
        predict_batch(state, padded[i:i + batch_size], top_k=top_k, with_attention=attention)
        for i in range(0, len(padded), batch_size)])
    if not outputs:  # no images
        return Prediction(np.zeros((0, top_k), np.int32), np.zeros((0, top_k), np.float32), [])
    classes, probabilities, gates = zip(*outputs)
    return Prediction(np.concatenate(classes)[:n], np.concatenate(probabilities)[:n],
                      [np.concatenate(block)[:n] for block in zip(*gates)])


# --- export ----------------------------------------------------------------------------------

def export_stablehlo(state, platforms: tuple[str, ...] | None = None,
                     image_size: int = IMAGE_SHAPE[0]) -> bytes:
    """The eval-mode model as serialized StableHLO (`jax.export`), its variables inside: a
    function of normalised float32 images [batch, S, S, 3] (S = `image_size`), any batch, to
    float32 logits [batch, K]. `platforms` it is lowered for (default: this backend), e.g.
    ('cpu', 'cuda').

    Reload and run it with JAX alone: `jax.export.deserialize(blob).call(x)`. With the
    variables as constants, XLA folds part of the arithmetic (BatchNorm's scale and shift)
    when it compiles, so the logits agree with `eval_logits` to float32 rounding, not bitwise.
    """
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    constant_state = state.replace(**variables)
    batch, = jax.export.symbolic_shape("batch")
    exported = jax.export.export(jax.jit(lambda x: eval_logits(constant_state, x)),
                                 platforms=platforms)(
        jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32))
    return exported.serialize()
