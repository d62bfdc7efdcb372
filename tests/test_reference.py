"""The PyTorch reference modules match the tutorial's structure and checkpoints."""
import warnings

import torch

from parity.reference import (CBAM, CBAM_CNN, TUTORIAL_COUNTS, ChannelAttention,
                              SpatialAttention)


def test_parameters_are_the_tutorials_in_order_and_count():
    counts = {name: p.numel() for name, p in CBAM_CNN().named_parameters()}
    assert counts == TUTORIAL_COUNTS
    assert list(counts) == list(TUTORIAL_COUNTS)
    assert sum(counts.values()) == 1_150_896


def test_tutorial_checkpoint_loads_strict(tmp_path):
    torch.manual_seed(0)
    saved = CBAM_CNN()
    path = tmp_path / "cifar10_cbam_cnn_model.pth"
    torch.save(saved.state_dict(), path)  # what the tutorial's script does
    loaded = CBAM_CNN()
    result = loaded.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, tensor in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_buffers_are_batchnorm_running_stats():
    buffers = [n for n, _ in CBAM_CNN().named_buffers()]
    assert buffers == [f"bn{i}.{b}" for i in (1, 2, 3)
                       for b in ("running_mean", "running_var", "num_batches_tracked")]


def test_cbam_cnn_maps_cifar_batch_to_ten_logits():
    assert CBAM_CNN().eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_fc1_reuses_relu3_like_the_tutorial():
    model = CBAM_CNN()
    calls = []
    model.relu3.register_forward_hook(lambda m, args, out: calls.append(out.shape))
    model.eval()(torch.zeros(1, 3, 32, 32))
    assert calls == [(1, 128, 8, 8), (1, 512)]


def test_spatial_attention_pools_avg_then_max():
    sa = SpatialAttention(kernel_size=1)
    with torch.no_grad():
        sa.conv.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))  # read the avg map only
    x = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    assert torch.allclose(sa(x), x * torch.sigmoid(torch.tensor(2.0)))


def test_cbam_is_channel_then_spatial():
    cbam = CBAM(32).eval()
    x = torch.randn(2, 32, 5, 6)
    assert torch.equal(cbam(x), cbam.spatial_attn(cbam.channel_attn(x)))


def test_channel_attention_below_ratio_channels_is_zero_width_like_the_tutorial():
    # Kept faithful: 8 // 16 == 0 hidden units, a degenerate (all-zero) MLP; cbam_jax floors it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "Initializing zero-element tensors is a no-op"
        ca = ChannelAttention(8)
    assert ca.fc[0].out_features == 0
    x = torch.randn(1, 8, 3, 3)
    assert torch.equal(ca(x), x * 0.5)
