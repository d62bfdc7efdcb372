"""Numeric comparisons of cbam_jax.CBAMCNN against the tutorial's CBAM_CNN, one row per tensor.

Both models start from one state_dict (converted exactly); every comparison runs in float32 (the
PyTorch side on CPU unless `device` says otherwise; `run_report` keeps both frameworks off TF32,
see `float32_precision`) and, unless stated otherwise, passes when
`max |jax - torch| <= atol + rtol * max |torch|`.
The two sides reduce in different orders (XLA vs ATen convolutions, sums and matmuls), so they
agree to float32 rounding amplified by depth, not bitwise. The tolerances below state what each comparison allows and why.
Two places are discontinuous or ill-conditioned in exact arithmetic and are handled explicitly:
conv biases before a train-mode BatchNorm (zero gradient, ZERO_GRADIENT_PARAMS) and max-pool
windows whose top two values tie within rounding (ADAM_UPDATE); a seed whose batch has such a
tie can show a FAIL in the grad rows that is routing, not a bug: try another --seed.
"""
import contextlib
import dataclasses
import functools
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from cbam_jax.data import IMAGE_SHAPE
from cbam_jax.models import BLOCK_CHANNELS, CBAMCNN
from cbam_jax.train import TrainState, adam_step, cross_entropy, make_optimizer
from parity.convert import flax_to_torch, torch_to_flax, variables_template
from parity.reference import CBAM_CNN


@dataclasses.dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float  # relative to the largest |torch| entry of the tensor
    why: str


# Observed maxima (seed 0, batch 16, 2 CPU cores, torch 2.13 / jax 0.10) are quoted in each `why`;
# tolerances leave one to two orders of magnitude of headroom.
FORWARD = Tolerance(1e-5, 1e-5, "float32 sums in another order, ~10 layers deep; "
                    "observed max abs ~1e-6 on O(1) activations")
# The conv biases' gradients are float32 noise around an exact zero (see ZERO_GRADIENT_PARAMS):
# their relative difference is O(1), their absolute one ~1e-8, which atol covers.
GRADIENT = Tolerance(1e-6, 1e-4, "backward sums over batch and space in another order; "
                     "observed max rel (to max |grad|) ~3e-6")
# Max-pool gradients are discontinuous: a window whose top two inputs lie within float32
# rounding of each other may send its gradient to a different element in each framework. This
# happens now and then (seen at step 5 of 5 at batch 16, and at step 1 at batch 64) and moves
# one step's update of the layers below by ~1e-3 relative; a wrong Adam rule is far outside
# (without bias correction the first step alone is 3.2x too long).
ADAM_UPDATE = Tolerance(0.0, 1e-2, "||jax - torch|| / ||torch update||: near-zero gradient "
                        "entries take noise-set steps (compare_update) and near-tied max-pool "
                        "windows may route differently; observed 1e-5, 2e-3 after a tie")
ADAM_LOGITS = Tolerance(1e-4, 1e-3, "logits from parameters that agree within ADAM_UPDATE; "
                        "observed max abs 2e-6, 3e-5 after a max-pool tie")
RUNNING_STATS = Tolerance(1e-5, 1e-5, "batch means/variances of float32 activations; "
                          "observed max abs ~1e-7")
EXACT = Tolerance(0.0, 0.0, "integer counter")


@dataclasses.dataclass(frozen=True)
class Comparison:
    name: str
    max_abs: float
    max_rel: float  # max_abs / max |torch|
    tol: float  # the bound on max_abs (or on max_rel when `relative`)
    why: str = ""
    relative: bool = False

    @property
    def passed(self) -> bool:
        return bool((self.max_rel if self.relative else self.max_abs) <= self.tol)  # NaN fails


def compare(name: str, jax_value, torch_value, tolerance: Tolerance) -> Comparison:
    """One row: both values as float64 numpy in the same (PyTorch) layout."""
    a = np.asarray(jax_value, np.float64)
    b = (torch_value.detach().cpu().numpy() if isinstance(torch_value, torch.Tensor)
         else np.asarray(torch_value)).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{name}: JAX shape {a.shape} vs PyTorch shape {b.shape}")
    max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return Comparison(name, max_abs, max_rel, tolerance.atol + tolerance.rtol * scale,
                      tolerance.why)


def nhwc_to_nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def nchw_to_nhwc(x: torch.Tensor) -> jax.Array:
    return jnp.asarray(x.detach().cpu().numpy().transpose(0, 2, 3, 1))


def random_state_dict(seed: int) -> "OrderedDict[str, torch.Tensor]":
    """A CBAM_CNN state_dict with PyTorch's init, plus random BatchNorm affine params and running
    statistics, so that eval-mode BatchNorm is not the identity and gets exercised."""
    torch.manual_seed(seed)
    model = CBAM_CNN()
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(1, len(BLOCK_CHANNELS) + 1):
        bn = getattr(model, f"bn{i}")
        n = bn.num_features
        with torch.no_grad():
            bn.weight.copy_(torch.rand(n, generator=g) + 0.5)  # U(0.5, 1.5)
            bn.bias.copy_(0.2 * torch.randn(n, generator=g))
            bn.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            bn.running_var.copy_(torch.rand(n, generator=g) + 0.25)  # U(0.25, 1.25)
            bn.num_batches_tracked.fill_(int(torch.randint(0, 1000, (), generator=g)))
    return model.state_dict()


def random_batch(seed: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [B, 3, 32, 32] standard normal (like normalised CIFAR), labels: [B] in 0..9."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, IMAGE_SHAPE[2], *IMAGE_SHAPE[:2], generator=g)
    y = torch.randint(0, 10, (batch_size,), generator=g)
    return x, y


@contextlib.contextmanager
def float32_precision():
    """Full float32 arithmetic on both sides inside the block. On a GPU both frameworks may
    otherwise run float32 matmuls and convolutions in TF32 (a 10-bit mantissa, ~1e-3 relative),
    which would read as a parity failure; on CPU nothing changes."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def torch_model(state_dict, dropout: float = 0.5, device: str = "cpu") -> CBAM_CNN:
    model = CBAM_CNN()
    model.load_state_dict(state_dict, strict=True)
    model.dropout.p = dropout
    return model.to(device)


def _on_cpu(tensors: dict) -> dict:
    """A snapshot of {name: tensor}, copied to host memory (the model may live on a GPU)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}


# Modules compared activation by activation, in forward order; each has a Flax twin of the
# same (dotted) name. `cbamN` itself is left out: its output is its spatial_attn's.
LAYERS = tuple(
    name for i in range(1, len(BLOCK_CHANNELS) + 1)
    for name in (f"conv{i}", f"bn{i}", f"cbam{i}.channel_attn", f"cbam{i}.spatial_attn")
) + ("fc1", "fc2")


def torch_activations(model: CBAM_CNN, x: torch.Tensor, train: bool) -> dict[str, torch.Tensor]:
    """{layer: output} for LAYERS (the last is the logits), mutating BN stats when training."""
    outputs, hooks = {}, []
    for name in LAYERS:
        hook = lambda module, args, out, name=name: outputs.__setitem__(name, out.detach())
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    model.train(train)
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return outputs


def jax_activations(model: CBAMCNN, variables, x, train: bool, rng=None):
    """({layer: output in NCHW/NC layout}, new batch_stats) for LAYERS."""
    # One compiled program: op-by-op dispatch of the model compiles every op for every shape.
    apply = jax.jit(functools.partial(model.apply, train=train, capture_intermediates=True,
                                      mutable=["intermediates", "batch_stats"]))
    _, state = apply(variables, x, rngs=None if rng is None else {"dropout": rng})
    outputs = {}
    for name in LAYERS:
        node = state["intermediates"]
        for key in name.split("."):
            node = node[key]
        out = np.asarray(node["__call__"][0])
        outputs[name] = nhwc_to_nchw(out) if out.ndim == 4 else out
    return outputs, state["batch_stats"]


def forward_comparisons(state_dict, x: torch.Tensor, train: bool,
                        device: str = "cpu") -> list[Comparison]:
    """Per-layer activations (and, in train mode, the updated running statistics); dropout off."""
    mode = "train" if train else "eval"
    tm = torch_model(state_dict, dropout=0.0, device=device)
    expected = torch_activations(tm, x.to(device), train)
    got, batch_stats = jax_activations(CBAMCNN(dropout_rate=0.0), torch_to_flax(state_dict),
                                       nchw_to_nhwc(x), train)
    rows = [compare(f"{mode} {name}", got[name], expected[name], FORWARD) for name in LAYERS]
    if train:
        rows += _stats_comparisons(f"{mode} ", batch_stats, tm.state_dict())
    return rows


def _stats_comparisons(prefix, batch_stats, torch_state) -> list[Comparison]:
    """BatchNorm buffers after an update: running_mean/var and num_batches_tracked."""
    converted = flax_to_torch({"params": _params_template(), "batch_stats": batch_stats})
    return [compare(prefix + name, converted[name], torch_state[name],
                    EXACT if name.endswith("num_batches_tracked") else RUNNING_STATS)
            for name in converted if name.rsplit(".", 1)[-1] in _BUFFERS]


_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _params_template():
    """Zero params of the right structure, to convert batch_stats (or grads) on their own."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables_template()["params"])


def _torch_named_params(tree, batch_stats) -> "OrderedDict[str, torch.Tensor]":
    """A params-shaped tree (params or grads) as {torch name: tensor} for CBAM_CNN's parameters."""
    converted = flax_to_torch({"params": tree, "batch_stats": batch_stats})
    return OrderedDict((k, v) for k, v in converted.items()
                       if k.rsplit(".", 1)[-1] not in _BUFFERS)


def _jax_loss(model, params, batch_stats, x, y):
    logits, state = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
    return cross_entropy(logits, y), state["batch_stats"]


def gradient_comparisons(state_dict, x: torch.Tensor, y: torch.Tensor,
                         device: str = "cpu") -> list[Comparison]:
    """d(mean cross-entropy)/d(every parameter), train mode, dropout off."""
    tm = torch_model(state_dict, dropout=0.0, device=device).train()
    F.cross_entropy(tm(x.to(device)), y.to(device)).backward()
    variables = torch_to_flax(state_dict)
    model = CBAMCNN(dropout_rate=0.0)
    grad_fn = jax.jit(jax.grad(functools.partial(_jax_loss, model), has_aux=True))
    grads, _ = grad_fn(variables["params"], variables["batch_stats"], nchw_to_nhwc(x),
                       jnp.asarray(y.numpy()))
    got = _torch_named_params(grads, variables["batch_stats"])
    return [compare(f"grad {name}", got[name], p.grad, GRADIENT)
            for name, p in tm.named_parameters()]


def adam_comparisons(state_dict, batches, eval_x: torch.Tensor, learning_rate: float = 1e-3,
                     device: str = "cpu") -> tuple[list[Comparison], dict]:
    """Adam steps on the given (x, y) batches in both frameworks (train mode, dropout off), then
    every parameter and BatchNorm buffer, and logits on `eval_x`. Also returns the JAX
    variables after the steps."""
    tm = torch_model(state_dict, dropout=0.0, device=device).train()
    opt = torch.optim.Adam(tm.parameters(), lr=learning_rate)
    torch_biases = []  # conv biases used by each step's forward, see _bias_free_running_mean
    for x, y in batches:
        torch_biases.append(_on_cpu(tm.state_dict()))
        opt.zero_grad()
        F.cross_entropy(tm(x.to(device)), y.to(device)).backward()
        opt.step()

    model = CBAMCNN(dropout_rate=0.0)
    tx = make_optimizer(learning_rate)
    variables = torch_to_flax(state_dict)
    no_dropout = jax.random.key(0)  # dropout_rate=0: the key is never used
    # The engine's own update (train.adam_step), so the comparison covers the training code.
    state = TrainState(step=jnp.zeros((), jnp.int32), apply_fn=model.apply,
                       params=variables["params"], tx=tx, opt_state=tx.init(variables["params"]),
                       batch_stats=variables["batch_stats"], rng=no_dropout)
    step = jax.jit(lambda state, x, y: adam_step(state, x, y, no_dropout)[0])

    jax_biases = []
    for x, y in batches:
        jax_biases.append(flax_to_torch({"params": state.params,
                                         "batch_stats": state.batch_stats}))
        state = step(state, nchw_to_nhwc(x), jnp.asarray(y.numpy()))
    trained = {"params": state.params, "batch_stats": state.batch_stats}
    got = flax_to_torch(trained)
    expected = _on_cpu(tm.state_dict())

    n = len(batches)
    prefix = f"adam{n} "
    rows = []
    for name, value in expected.items():
        module, leaf = name.rsplit(".", 1)
        if leaf == "num_batches_tracked":
            rows.append(compare(prefix + name, got[name], value, EXACT))
        elif leaf == "running_var":
            rows.append(compare(prefix + name, got[name], value, RUNNING_STATS))
        elif leaf == "running_mean":
            conv = "conv" + module.removeprefix("bn") + ".bias"
            rows.append(compare(
                f"{prefix}{name} (minus {conv})",
                _bias_free_running_mean(got[name], [b[conv] for b in jax_biases]),
                _bias_free_running_mean(value, [b[conv] for b in torch_biases]), RUNNING_STATS))
        elif name in ZERO_GRADIENT_PARAMS:
            rows.append(compare(prefix + name, got[name], value,
                                _zero_gradient_adam(n, learning_rate)))
        else:
            rows.append(compare_update(prefix + name, got[name], value, state_dict[name]))

    eval_x_nhwc = nchw_to_nhwc(eval_x)
    with torch.no_grad():  # eval first: the train-mode forward updates the running stats
        expected_eval = tm.eval()(eval_x.to(device))
        expected_train = tm.train()(eval_x.to(device))
    logits, _ = model.apply(trained, eval_x_nhwc, train=True, mutable=["batch_stats"])
    rows.append(compare(prefix + "train logits", logits, expected_train, ADAM_LOGITS))
    # Eval mode reads conv bias - running_mean, both driven by the bias noise above; taking those
    # two from PyTorch compares everything else (weights after Adam, running_var) tightly.
    noise_free = torch_to_flax(OrderedDict(
        (k, expected[k] if k in ZERO_GRADIENT_PARAMS or k.endswith("running_mean") else v)
        for k, v in got.items()))
    logits = model.apply(noise_free, eval_x_nhwc, train=False)
    rows.append(compare(prefix + "eval logits (torch conv biases, running means)", logits,
                        expected_eval, ADAM_LOGITS))
    return rows, trained


# A conv bias followed by a train-mode BatchNorm has zero gradient in exact arithmetic (the
# normalisation removes any per-channel shift); what both frameworks compute is float32 noise
# (~1e-8). Adam (eps 1e-8) turns that noise into steps of up to ~lr in either direction, so
# only a bound is comparable: each side moves at most ~lr per step.
ZERO_GRADIENT_PARAMS = tuple(f"conv{i}.bias" for i in range(1, len(BLOCK_CHANNELS) + 1))


def _zero_gradient_adam(steps: int, learning_rate: float) -> Tolerance:
    return Tolerance(2 * steps * learning_rate, 0.0, "gradient is zero in exact arithmetic, "
                     "Adam steps on float32 noise: only the bound 2 * steps * lr holds")


def _bias_free_running_mean(running_mean, biases, momentum: float = 0.1):
    """running_mean minus the conv bias's share of it: sum_t m (1 - m)^(n - t) b_(t-1).

    What remains is the running mean of the bias-free conv output, which does not depend on
    the bias noise (see ZERO_GRADIENT_PARAMS) and so is comparable across frameworks.
    """
    n = len(biases)
    share = sum(momentum * (1 - momentum) ** (n - 1 - t) * np.asarray(b, np.float64)
                for t, b in enumerate(biases))
    return np.asarray(running_mean, np.float64) - share


def compare_update(name: str, jax_value, torch_value, start) -> Comparison:
    """Parameters after Adam steps, judged by ||jax - torch|| / ||torch - start||.

    A max-abs bound would not do: Adam divides each gradient entry by its own running RMS, so
    an entry whose gradient is near zero by cancellation (and so differs in relative terms
    between frameworks) still moves by a large fraction of lr, in a noise-set direction.
    Those few entries barely change the norm of the update, while a wrong update rule
    (bias correction, eps inside the root, another beta) changes it by percent.
    """
    a, b, s = (np.asarray(v.detach().numpy() if isinstance(v, torch.Tensor) else v, np.float64)
               for v in (jax_value, torch_value, start))
    moved = float(np.linalg.norm(b - s))
    diff = float(np.linalg.norm(a - b))
    rel = diff / moved if moved > 0 else (0.0 if diff == 0 else float("inf"))
    return Comparison(name, float(np.max(np.abs(a - b))), rel, ADAM_UPDATE.rtol, ADAM_UPDATE.why,
                      relative=True)


def run_report(state_dict, seed: int = 0, batch_size: int = 16, adam_steps: int = 5,
               device: str = "cpu"):
    """All comparisons from one state_dict: eval and train forward, gradients, Adam steps.
    The JAX side runs on JAX's default device, the PyTorch side on `device`.

    Returns (rows, JAX variables after the Adam steps).
    """
    x, y = random_batch(seed, batch_size)
    batches = [random_batch(seed + 1 + i, batch_size) for i in range(adam_steps)]
    with float32_precision():
        rows = forward_comparisons(state_dict, x, train=False, device=device)
        rows += forward_comparisons(state_dict, x, train=True, device=device)
        rows += gradient_comparisons(state_dict, x, y, device=device)
        adam_rows, trained = adam_comparisons(state_dict, batches, x, device=device)
    return rows + adam_rows, trained


def format_table(rows: list[Comparison]) -> str:
    """The report: one row per comparison; the tolerance bounds the column its suffix names."""
    width = max(len(r.name) for r in rows)
    lines = [f"{'comparison':<{width}}  {'max abs diff':>12}  {'max rel diff':>12}  "
             f"{'tolerance':>13}  result"]
    for r in rows:
        bound = f"{r.tol:.2e} {'rel' if r.relative else 'abs'}"
        lines.append(f"{r.name:<{width}}  {r.max_abs:12.3e}  {r.max_rel:12.3e}  {bound:>13}  "
                     f"{'PASS' if r.passed else 'FAIL'}")
    failed = sum(not r.passed for r in rows)
    lines.append("rel: max abs diff / max |torch|; for adam rows of parameters, "
                 "||jax - torch|| / ||torch update||.")
    lines.append(f"{len(rows) - failed}/{len(rows)} comparisons passed"
                 + (f", {failed} FAILED" if failed else ""))
    return "\n".join(lines)
