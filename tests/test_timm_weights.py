"""timm parity: timm's Xception weights (.safetensors) give timm's logits in Flax.

timm (on CPU torch, test-only extras in requirements-test.txt) builds each model with random
weights and randomised BatchNorm statistics, saves it with safetensors; `timm_weights` reads the
file with numpy only and the Flax model must give timm's own logits.
"""

import functools
import importlib.util

import conftest
import jax
import numpy as np
import pytest

from xception_jax.weights import timm_weights

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("timm") is None or importlib.util.find_spec("torch") is None,
    reason="timm and torch (requirements-test.txt) not installed",
)

NUM_CLASSES = 10
# The smallest inputs that exercise everything: the aligned models accept 32 px; for the legacy
# model 77 px puts even sizes (36, 18) before the first two max-pools, where TF's 'SAME' and
# PyTorch's padding of 1 differ (at 71 px every pool input is odd).
SIZES = {"xception41": 32, "xception65": 32, "xception71": 32, "legacy_xception": 77}


def _timm_reference(name: str, path, **kwargs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Saves a random timm `name` (BatchNorm randomised) to `path`.

    Returns the NHWC input, its logits, and (legacy_xception) the output of timm's first block
    (this package's 'block2' feature, NHWC) or None.
    """
    torch, timm = conftest.torch_timm()
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=NUM_CLASSES, **kwargs).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 1.5)
        x = torch.rand(2, 3, SIZES[name], SIZES[name]) * 2 - 1
        logits = model(x).numpy()
        block = None
        if name == "legacy_xception":
            y = model.act2(model.bn2(model.conv2(model.act1(model.bn1(model.conv1(x))))))
            block = model.block1(y).numpy().transpose(0, 2, 3, 1)
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(path))
    return x.numpy().transpose(0, 2, 3, 1), logits, block


def _relative_error(out, ref) -> float:
    return float(np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def xception41_file(tmp_path_factory):
    """A saved random timm xception41 (for the error tests)."""
    path = tmp_path_factory.mktemp("timm") / "xception41.safetensors"
    _timm_reference("xception41", path)
    return path


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("xception41", {}),
        ("xception65", {}),
        ("xception65", {"output_stride": 16}),
        ("xception71", {}),
        ("legacy_xception", {}),
    ],
    ids=["xception41", "xception65", "xception65_os16", "xception71", "legacy_xception"],
)
def test_logits_equal_timm(tmp_path, name, kwargs):
    path = tmp_path / f"{name}.safetensors"
    x, ref, block_ref = _timm_reference(name, path, **kwargs)
    model, variables = timm_weights.load_model(str(path), name, **kwargs)
    assert model.num_classes == NUM_CLASSES
    out = jax.jit(functools.partial(model.apply, train=False))(variables, x)
    assert _relative_error(out, ref) < 1e-4
    if name == "legacy_xception":
        # Each of the two settings matters: with either Keras default instead (epsilon 1e-3,
        # TF 'SAME' pools) the first block's features miss timm's by more than the tolerance.
        # (The pools' padding changes only edge rows, which the average pool before the
        # classifier dilutes: the first block shows it.)
        @functools.partial(jax.jit, static_argnums=0)
        def block2(m):
            return m.apply(variables, x, return_features=True)["block2"]

        assert _relative_error(block2(model), block_ref) < 1e-4
        assert _relative_error(block2(model.clone(bn_epsilon=1e-3)), block_ref) > 1e-4
        assert _relative_error(block2(model.clone(pool_padding="SAME")), block_ref) > 1e-2


def test_file_of_another_variant_is_refused(xception41_file):
    with pytest.raises(ValueError) as err:
        timm_weights.load(str(xception41_file), "xception65")
    message = str(err.value)
    assert "looks like timm's 'xception41'" in message
    # The first mismatches, with both shapes: xception65's middle blocks go on past 41's.
    assert "missing in the file" in message or "model (" in message
    with pytest.raises(ValueError, match="looks like timm's 'xception41'"):
        timm_weights.load(str(xception41_file), "legacy_xception")


def test_mismatched_tensor_names_both_shapes(xception41_file, tmp_path):
    from safetensors.numpy import save_file

    tensors = timm_weights.read_tensors(str(xception41_file))
    tensors["blocks.1.stack.conv2.conv_pw.weight"] = np.zeros((5, 256, 1, 1), np.float32)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ValueError) as err:
        timm_weights.load(str(path), "xception41")
    assert (
        "blocks.1.stack.conv2.conv_pw.weight: file (5, 256, 1, 1), model (256, 256, 1, 1)"
        in str(err.value)
    )


def test_not_a_safetensors_file_and_unknown_variant(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="Cannot read .* as safetensors"):
        timm_weights.load(str(path), "xception41")
    with pytest.raises(ValueError, match="timm variants"):
        timm_weights.load(str(path), "xception_tiny")


def test_init_from_timm_fills_the_backbone(xception41_file):
    """config.init_from_timm: every variable but the classifier from the file (fine-tuning)."""
    from configs import common
    from xception_jax.model import registry
    from xception_jax.training import config_checks, pretrained

    config = common.base_config()
    config.model.name = "xception41"
    config.init_from_timm = str(xception41_file)
    assert config_checks.pretrained_errors(config) == []
    model = registry.create_model_from_config(config, num_classes=3)  # Another number of classes.
    fresh = jax.device_get(jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32, 32, 3))))
    merged = pretrained.merge(fresh, pretrained.load_backbone(config), "the timm file")
    loaded = timm_weights.load(str(xception41_file), "xception41")
    np.testing.assert_array_equal(
        merged["params"]["block7_sepconv2"]["pointwise"]["kernel"],
        loaded["params"]["block7_sepconv2"]["pointwise"]["kernel"],
    )
    np.testing.assert_array_equal(
        merged["batch_stats"]["block1_conv1_bn"]["var"],
        loaded["batch_stats"]["block1_conv1_bn"]["var"],
    )
    assert merged["params"]["predictions"]["kernel"].shape == (2048, 3)  # Fresh, 3 classes.

    config.model.name = "xception"
    config.init_from_keras = "/elsewhere/x.h5"
    errors = " ".join(config_checks.pretrained_errors(config))
    assert "Set only one of config.init_from_keras, config.init_from_timm" in errors
    assert "config.init_from_timm needs config.model.name to be the file's timm variant" in errors


def test_predict_with_timm_weights(xception41_file, tmp_path, capsys):
    from PIL import Image

    from xception_jax import predict

    image = tmp_path / "noise.png"
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    argv = ["--timm_weights", str(xception41_file), "--model", "xception41", "--image_size", "32"]
    predict.main([*argv, "--top_k", "3", str(image)])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(image) and len(out) == 4
    model, variables = timm_weights.load_model(str(xception41_file), "xception41")
    apply = jax.jit(functools.partial(model.apply, train=False))
    logits = apply(variables, predict.load_images([str(image)], 32) / 127.5 - 1.0)
    assert out[1].split()[-1] == str(int(np.argmax(logits)))  # 10 classes: labels are indices.
    with pytest.raises(SystemExit):
        predict.main(["--timm_weights", str(xception41_file), str(image)])  # No --model.
    assert "--timm_weights needs --model" in capsys.readouterr().err
