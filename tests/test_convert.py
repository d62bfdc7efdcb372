"""Weight conversion between CBAM_CNN state_dicts and CBAMCNN variables: exact, strict, ordered."""
import re
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cbam_jax import CBAMCNN, parameter_report
from parity import flax_to_torch, load_pth, save_pth, torch_to_flax
from parity.reference import CBAM_CNN, TUTORIAL_COUNTS


@pytest.fixture(scope="module")
def state_dict():
    torch.manual_seed(0)
    model = CBAM_CNN()
    with torch.no_grad():  # non-default buffers, so that they are really carried over
        for i in (1, 2, 3):
            bn = getattr(model, f"bn{i}")
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.num_batches_tracked.fill_(1234 + i)
    return model.state_dict()


@pytest.fixture(scope="module")
def jax_variables():
    return CBAMCNN().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_torch_to_flax_to_torch_is_bitwise(state_dict):
    back = flax_to_torch(torch_to_flax(state_dict))
    assert list(back) == list(state_dict)
    for name, tensor in state_dict.items():
        assert back[name].dtype == tensor.dtype, name
        assert back[name].shape == tensor.shape, name
        assert torch.equal(back[name], tensor), name


def test_flax_to_torch_to_flax_is_bitwise(jax_variables):
    variables = dict(jax_variables)
    variables["batch_stats"] = jax.tree.map(lambda a: a + 3, variables["batch_stats"])
    back = torch_to_flax(flax_to_torch(variables))
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_state_dict_types_are_pytorchs(jax_variables):
    converted = flax_to_torch(jax_variables)
    assert isinstance(converted, OrderedDict)
    counter = converted["bn1.num_batches_tracked"]
    assert counter.dtype == torch.int64 and counter.ndim == 0
    assert all(t.dtype == torch.float32 for n, t in converted.items()
               if not n.endswith("num_batches_tracked"))


def test_converted_jax_init_loads_into_cbam_cnn_strict(jax_variables):
    model = CBAM_CNN()
    model.load_state_dict(flax_to_torch(jax_variables), strict=True)
    kernel = np.asarray(jax_variables["params"]["conv1"]["kernel"])  # HWIO
    assert np.array_equal(model.conv1.weight.detach().numpy(), kernel.transpose(3, 2, 0, 1))


def test_converted_params_keep_the_tutorials_order(state_dict):
    counts = parameter_report(torch_to_flax(state_dict)["params"], print_fn=None)
    assert list(counts.items()) == list(TUTORIAL_COUNTS.items())


def test_fc1_rows_follow_the_nhwc_flatten_order(state_dict):
    # PyTorch's fc1 input index c*16 + h*4 + w is NHWC's (h*4 + w)*128 + c.
    kernel = np.asarray(torch_to_flax(state_dict)["params"]["fc1"]["kernel"])
    weight = state_dict["fc1.weight"].numpy()
    c, h, w, out = 5, 2, 3, 7
    assert kernel[(h * 4 + w) * 128 + c, out] == weight[out, c * 16 + h * 4 + w]


def test_linear_and_conv_layouts(state_dict):
    params = torch_to_flax(state_dict)["params"]
    fc0 = state_dict["cbam2.channel_attn.fc.0.weight"].numpy()  # [out, in]
    assert np.array_equal(params["cbam2"]["channel_attn"]["fc_0"]["kernel"], fc0.T)
    sa = state_dict["cbam1.spatial_attn.conv.weight"].numpy()  # [1, 2, 7, 7] OIHW
    assert np.array_equal(params["cbam1"]["spatial_attn"]["conv"]["kernel"],
                          sa.transpose(2, 3, 1, 0))


def test_batchnorm_buffers_map_to_batch_stats(state_dict):
    stats = torch_to_flax(state_dict)["batch_stats"]["bn2"]
    assert np.array_equal(stats["mean"], state_dict["bn2.running_mean"].numpy())
    assert np.array_equal(stats["var"], state_dict["bn2.running_var"].numpy())
    assert stats["num_batches_tracked"].dtype == jnp.int32
    assert int(stats["num_batches_tracked"]) == 1236


def test_another_models_state_dict_lists_missing_unexpected_and_misshaped(state_dict):
    bad = OrderedDict(state_dict)
    del bad["fc2.bias"]
    bad["fc3.weight"] = torch.zeros(10, 512)
    bad["fc1.weight"] = torch.zeros(512, 1024)
    with pytest.raises(ValueError) as err:
        torch_to_flax(bad)
    message = str(err.value)
    assert "missing keys: fc2.bias" in message
    assert "unexpected keys: fc3.weight" in message
    assert "fc1.weight: got shape [512, 1024], expected [512, 2048]" in message


def test_dataparallel_prefixed_keys_are_reported_unexpected(state_dict):
    prefixed = OrderedDict((f"module.{k}", v) for k, v in state_dict.items())
    with pytest.raises(ValueError, match=r"unexpected keys: module\.conv1\.weight"):
        torch_to_flax(prefixed)


def test_variables_without_batch_stats_are_rejected(jax_variables):
    with pytest.raises(ValueError, match="missing keys: batch_stats/bn1/mean"):
        flax_to_torch({"params": jax_variables["params"]})


def test_variables_of_another_width_are_rejected(jax_variables):
    wide = CBAMCNN(num_classes=100).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"params/fc2/kernel: got shape \[512, 100\], "
                                         r"expected \[512, 10\]"):
        flax_to_torch(wide)


def test_non_mapping_is_a_type_error():
    with pytest.raises(TypeError, match="state_dict mapping"):
        torch_to_flax(CBAM_CNN())


def test_save_pth_loads_into_cbam_cnn_and_back(tmp_path, jax_variables):
    path = tmp_path / "exported.pth"
    save_pth(jax_variables, path)
    CBAM_CNN().load_state_dict(torch.load(path, weights_only=True), strict=True)
    back = load_pth(path)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(jax_variables)):
        assert np.array_equal(a, b)


# --- load_pth: what is not the tutorial's state_dict -----------------------------------------

class _CreatesAFile:
    """Unpickling this calls open(path, "w"): what a malicious pickle does, harmlessly."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _truncated(path, state_dict):
    torch.save(state_dict, path)
    path.write_bytes(path.read_bytes()[:300])


NOT_A_STATE_DICT = {  # name: (write the file, what the one-line error says)
    "another network's state_dict": (
        lambda path, sd: torch.save(torch.nn.Linear(2, 2).state_dict(), path),
        r"does not match the tutorial's CBAM_CNN / cbam_jax.CBAMCNN: missing keys: conv1\.weight, "
        r".* and \d+ more; unexpected keys: weight, bias$"),
    "a training checkpoint around the state_dict": (
        lambda path, sd: torch.save({"state_dict": sd, "epoch": 3}, path),
        r"unexpected keys: state_dict, epoch$"),
    "a whole pickled model": (
        lambda path, sd: torch.save(CBAM_CNN(), path),
        r"holds pickled Python objects besides tensors \(.*parity\.reference\.CBAM_CNN.*\), e\.g\. "
        r"a whole model saved with torch\.save\(model\)"),
    "a list": (lambda path, sd: torch.save([sd["fc2.bias"]], path), r"holds a list, not a state_dict"),
    "a tensor": (lambda path, sd: torch.save(sd["fc2.bias"], path), r"holds a Tensor, not a"),
    "a text file": (lambda path, sd: path.write_text("hello, world\n"),
                    r"not a file that torch\.save wrote, or a damaged one"),
    "an empty file": (lambda path, sd: path.write_bytes(b""), r": an empty file; expected"),
    "a truncated state_dict": (_truncated, r"not a file that torch\.save wrote, or a damaged one"),
    "a folder": (lambda path, sd: path.mkdir(), r": not a file; expected"),
    "a malicious pickle": (
        lambda path, sd: torch.save({"x": _CreatesAFile(path.with_name("ran"))}, path),
        r"holds pickled Python objects besides tensors \(.*open\).*could run any code"),
    "a malicious pickle in torch's legacy format": (
        lambda path, sd: torch.save({"x": _CreatesAFile(path.with_name("ran"))}, path,
                                    _use_new_zipfile_serialization=False),
        r"torch\.load\(weights_only=True\) refuses what it holds"),
}


@pytest.mark.parametrize("name", NOT_A_STATE_DICT)
def test_load_pth_says_in_one_line_what_a_bad_file_holds_and_what_was_expected(
        name, tmp_path, state_dict):
    write, says = NOT_A_STATE_DICT[name]
    path = tmp_path / "model.pth"
    write(path, state_dict)
    with pytest.raises(ValueError) as info:
        load_pth(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 600
    assert re.search(says, message), message
    if "does not match" not in message:  # the key report says what was expected itself
        assert message.endswith("expected a state_dict of the tutorial's CBAM_CNN, saved with "
                                "torch.save(model.state_dict(), path)")
    assert "weights_only=False" not in message  # torch's advice would run the pickle
    assert info.value.__cause__ is None and (info.value.__context__ is None
                                             or info.value.__suppress_context__)  # no chain
    assert not (tmp_path / "ran").exists()  # the malicious pickles never ran


def test_the_malicious_pickle_runs_when_unpickled_without_weights_only(tmp_path):
    """The negative control of the test above: the file does run code if fully unpickled."""
    path = tmp_path / "model.pth"
    torch.save({"x": _CreatesAFile(tmp_path / "ran")}, path)
    torch.load(path, weights_only=False)
    assert (tmp_path / "ran").exists()


def test_load_pth_of_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth: no such file; expected a "
                                                "state_dict of the tutorial's CBAM_CNN"):
        load_pth(tmp_path / "missing.pth")


@pytest.mark.parametrize("name", ["a list", "a malicious pickle", "a text file"])
def test_python_m_parity_says_it_in_one_error_line(name, tmp_path, state_dict, capsys):
    from parity.__main__ import main

    write, says = NOT_A_STATE_DICT[name]
    path = tmp_path / "model.pth"
    write(path, state_dict)
    assert main(["--pth", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --pth: {path}: ") and err.count("\n") == 1
    assert re.search(says, err) and not (tmp_path / "ran").exists()
