"""The public surface at the package's top: the names users' scripts rely on, imported lazily."""

import subprocess
import sys

import pytest

PUBLIC = (
    "Xception",
    "count_params",
    "create_model",
    "load",
    "load_keras",
    "load_timm",
    "preprocess",
)


def test_importing_the_package_is_cheap_and_the_library_needs_tensorflow_only_for_data():
    """`import xception_jax` loads neither JAX nor TensorFlow nor orbax; the steps, models and
    checkpoints import without TensorFlow (~0.55 GB resident): only reading data
    (train_and_evaluate, evaluate) and the metric writers load it."""
    script = (
        "import sys, xception_jax\n"
        "heavy = ('jax', 'flax', 'tensorflow', 'orbax', 'h5py', 'torch')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
        "print(sorted(xception_jax.__all__))\n"
        "from xception_jax import predict\n"
        "from xception_jax.model import registry, xception\n"
        "from xception_jax.training import checkpoints, config_checks, loop, replay, steps\n"
        "print(sorted(m for m in ('tensorflow', 'clu.metric_writers') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    loaded, names, tensorflow = out.stdout.strip().splitlines()[-3:]
    assert loaded == "[]", out.stdout + out.stderr
    assert names == str(sorted(PUBLIC))
    assert tensorflow == "[]", out.stdout + out.stderr


def test_each_public_name_is_the_library_object_it_stands_for():
    import xception_jax
    from xception_jax.model import registry, xception
    from xception_jax.training import checkpoints
    from xception_jax.weights import keras_weights, timm_weights

    assert xception_jax.create_model is registry.create_model
    assert xception_jax.count_params is registry.count_params
    assert xception_jax.Xception is xception.Xception
    assert xception_jax.preprocess is xception.preprocess
    assert xception_jax.load is checkpoints.load
    assert xception_jax.load_keras is keras_weights.load_model
    assert xception_jax.load_timm is timm_weights.load_model
    assert set(PUBLIC) <= set(dir(xception_jax))
    with pytest.raises(AttributeError, match="no attribute 'models'"):
        xception_jax.models  # noqa: B018 - the old flat module is gone, and says so


def test_create_model_and_count_params_give_the_papers_parameter_count():
    import jax.numpy as jnp

    import xception_jax
    from xception_jax.model import registry

    model = xception_jax.create_model("xception", num_classes=1000)
    assert isinstance(model, xception_jax.Xception)
    variables = registry.abstract_variables(model, 299)
    assert xception_jax.count_params(variables["params"]) == 22_855_952
    images = jnp.array([[[[0, 255, 127]]]], jnp.uint8)
    expected = jnp.array([-1.0, 1.0, 127 / 127.5 - 1])
    assert jnp.allclose(xception_jax.preprocess(images), expected, atol=1e-6)
