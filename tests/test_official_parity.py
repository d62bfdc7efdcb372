"""CBAM.preset('official') against the official PyTorch gates (parity/official.py).

Tolerances: float32 on both sides, with reductions (the pools, the MLP, the 7x7 conv, the
BatchNorm statistics) summed in another order by XLA than by PyTorch, so results agree to a few
float32 ulps of the largest terms: rtol 1e-5, atol 1e-5 (gradients: atol 1e-5 on values of
order 1e-2..1). Runtime: ~10 s on 2 CPU cores.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cbam_jax import CBAM
from parity.official import CBAM as OfficialCBAM
from parity.official import flax_to_official, official_to_flax

CHANNELS = 32
POOLS = [("avg", "max"), ("avg", "max", "lp", "lse")]
TOL = dict(rtol=1e-5, atol=1e-5)


def _official(pool_types, no_spatial=False, seed=0):
    """The official module with every weight and BatchNorm buffer away from its init."""
    torch.manual_seed(seed)
    module = OfficialCBAM(CHANNELS, 16, pool_types, no_spatial)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.dtype == torch.float32:
                tensor.add_(0.3 * torch.randn_like(tensor))
        if not no_spatial:
            module.SpatialGate.spatial.bn.running_var.uniform_(0.5, 2.0)
            module.SpatialGate.spatial.bn.num_batches_tracked.fill_(7)
    return module


def _input(shape=(3, CHANNELS, 6, 5), seed=1):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)  # NCHW


def _nhwc(x):
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def _nchw(y):
    return np.asarray(y).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("pool_types", POOLS, ids="+".join)
def test_eval_forward_matches_official(pool_types):
    official = _official(pool_types).eval()
    x = _input()
    variables = official_to_flax(official.state_dict())
    y = CBAM.preset("official", pool_types=pool_types).apply(variables, _nhwc(x), train=False)
    with torch.no_grad():
        expected = official(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_nchw(y), expected, **TOL)


def test_no_spatial_matches_official_channel_gate_only():
    official = _official(("avg", "max"), no_spatial=True).eval()
    x = _input()
    variables = official_to_flax(official.state_dict())
    assert set(variables) == {"params"} and set(variables["params"]) == {"channel_attn"}
    y = CBAM.preset("official", no_spatial=True).apply(variables, _nhwc(x))
    with torch.no_grad():
        np.testing.assert_allclose(_nchw(y), official(torch.from_numpy(x)).numpy(), **TOL)


@pytest.mark.parametrize("pool_types", POOLS, ids="+".join)
def test_train_step_matches_official_output_grads_and_running_stats(pool_types):
    """One SGD step in train mode: outputs, every gradient, BatchNorm buffers, new weights."""
    official = _official(pool_types).train()
    x = _input(seed=2)
    cotangent = np.random.default_rng(3).normal(size=x.shape).astype(np.float32)
    variables = official_to_flax(official.state_dict())
    module = CBAM.preset("official", pool_types=pool_types)

    def loss(params, x):
        y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                  train=True, mutable=["batch_stats"])
        return jnp.sum(y * _nhwc(cotangent)), (y, updates["batch_stats"])

    (_, (y, stats)), (grads, grad_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], _nhwc(x))

    x_t = torch.from_numpy(x).requires_grad_(True)
    y_t = official(x_t)
    (y_t * torch.from_numpy(cotangent)).sum().backward()
    np.testing.assert_allclose(_nchw(y), y_t.detach().numpy(), **TOL)
    np.testing.assert_allclose(_nchw(grad_x), x_t.grad.numpy(), **TOL)

    converted = flax_to_official({"params": grads, "batch_stats": stats})
    for name, p in official.named_parameters():
        np.testing.assert_allclose(converted[name], p.grad.numpy(), err_msg=name, **TOL)
    for name, buffer in official.named_buffers():
        np.testing.assert_allclose(converted[name], buffer.numpy(), err_msg=name, **TOL)
    assert int(stats["spatial_attn"]["bn"]["num_batches_tracked"]) == 8

    lr = 0.1
    with torch.no_grad():
        for p in official.parameters():
            p -= lr * p.grad
    stepped = jax.tree.map(lambda p, g: p - lr * g, variables["params"], grads)
    after = flax_to_official({"params": stepped})
    for name, p in official.named_parameters():
        np.testing.assert_allclose(after[name], p.detach().numpy(), err_msg=name, **TOL)


def test_converters_round_trip_bitwise_and_load_strictly():
    official = _official(("avg", "max"))
    state_dict = official.state_dict()
    back = flax_to_official(official_to_flax(state_dict))
    assert list(back) == list(state_dict)
    for name, tensor in state_dict.items():
        assert torch.equal(back[name], tensor), name
    OfficialCBAM(CHANNELS).load_state_dict(back, strict=True)


def test_converted_shapes_are_the_presets_own():
    variables = official_to_flax(_official(("avg", "max")).state_dict())
    template = jax.eval_shape(CBAM.preset("official").init, jax.random.key(0),
                              jnp.zeros((1, 6, 5, CHANNELS)))
    assert jax.tree.structure(template) == jax.tree.structure(variables)
    assert all(t.shape == v.shape for t, v in zip(jax.tree.leaves(template),
                                                  jax.tree.leaves(variables)))


def test_foreign_state_dict_is_rejected_naming_the_expected_keys():
    with pytest.raises(ValueError, match="ChannelGate.mlp.1.weight"):
        official_to_flax({"fc.0.weight": torch.zeros(2, 32)})
