"""The Linen CBAM inside a flax.nnx model, through nnx.bridge.ToNNX. Runtime: ~25 s of CPU."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cbam_jax import CBAM


class Net(nnx.Module):
    """A user's NNX model: conv -> ReLU -> (Linen) CBAM -> global average pool -> linear."""

    def __init__(self, cbam: CBAM, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 32, (3, 3), rngs=rngs)
        self.cbam = nnx.bridge.ToNNX(cbam, rngs=rngs)
        self.head = nnx.Linear(32, 3, rngs=rngs)

    def features(self, x):
        return nnx.relu(self.conv(x))

    def __call__(self, x, train: bool = False):
        # mutable=["batch_stats"] lets the official preset's BatchNorm update its statistics.
        x = self.cbam(self.features(x), train=train, mutable=["batch_stats"] if train else False)
        return self.head(x.mean(axis=(1, 2)))


def _data():
    labels = jnp.arange(12) % 3
    x = jax.random.normal(jax.random.key(0), (12, 8, 8, 3)) + labels[:, None, None, None]
    return x, labels


def test_bridged_cbam_computes_what_the_linen_module_computes():
    x, _ = _data()
    model = Net(CBAM(ratio=8), nnx.Rngs(0))
    nnx.bridge.lazy_init(model, x)  # Linen needs an input to create its parameters
    params = nnx.to_pure_dict(nnx.state(model.cbam, nnx.Param))
    assert params["channel_attn"]["fc_0"]["kernel"].shape == (32, 4)
    assert params["spatial_attn"]["conv"]["kernel"].shape == (7, 7, 2, 1)
    h = model.features(x)
    np.testing.assert_array_equal(model.cbam(h), CBAM(ratio=8).apply({"params": params}, h))
    assert model(x).shape == (12, 3)


def test_grad_steps_train_the_bridged_official_cbam_and_its_batchnorm():
    x, labels = _data()
    model = Net(CBAM.preset("official", ratio=8), nnx.Rngs(0))
    nnx.bridge.lazy_init(model, x)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    before = nnx.to_pure_dict(nnx.state(model.cbam, nnx.Param))

    @nnx.jit
    def step(model, optimizer, x, labels):
        def loss_fn(model):
            logits = model(x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, x, labels)) for _ in range(8)]
    assert losses[-1] < losses[0], losses
    after = nnx.to_pure_dict(nnx.state(model.cbam, nnx.Param))
    for path, old in jax.tree_util.tree_leaves_with_path(before):
        new = after
        for key in path:
            new = new[key.key]
        assert not np.allclose(old, new), jax.tree_util.keystr(path)  # every CBAM weight moved
    stats = nnx.to_pure_dict(nnx.state(model.cbam, nnx.BatchStat))["spatial_attn"]["bn"]
    assert int(stats["num_batches_tracked"]) == 8
    assert not np.allclose(stats["mean"], 0.0)
