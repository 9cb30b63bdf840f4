"""export.py: the artifact runs in a fresh process without this package; logits as model.apply."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xception_jax import export
from xception_jax.model import registry, xception

# Serving as docs/inference.md shows it; importing xception_jax there fails (an import hook),
# so the artifact provably needs only JAX.
SERVE = textwrap.dedent(
    """
    import sys

    class NoXceptionJax:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "xception_jax":
                raise ImportError("the artifact must run without xception_jax")

    sys.meta_path.insert(0, NoXceptionJax())
    import numpy as np
    from jax import export

    exported = export.deserialize(open(sys.argv[1], "rb").read())
    images = np.load(sys.argv[2])
    np.savez(sys.argv[3], **{k: np.asarray(exported.call(v)) for k, v in images.items()})
    assert not [m for m in sys.modules if m.startswith("xception_jax")]
    """
)


def test_artifact_in_a_fresh_process_gives_the_logits(tmp_path):
    model = registry.create_model("xception_tiny", num_classes=7)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    exported = export.export_inference(model, variables, 32)
    assert exported.platforms == ("cpu", "cuda", "tpu")
    artifact = tmp_path / "tiny.jaxexport"
    artifact.write_bytes(exported.serialize())
    rng = np.random.default_rng(0)
    images = {f"b{n}": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (1, 3)}
    np.savez(tmp_path / "images.npz", **images)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run(
        [
            sys.executable,
            "-c",
            SERVE,
            str(artifact),
            str(tmp_path / "images.npz"),
            str(tmp_path / "out.npz"),
        ],
        cwd=tmp_path,
        env=env,
        check=True,
        timeout=300,
    )
    served = np.load(tmp_path / "out.npz")
    apply = jax.jit(lambda x: model.apply(variables, xception.preprocess(x), train=False))
    for key, batch in images.items():
        ref = np.asarray(apply(batch))
        assert served[key].shape == ref.shape
        assert np.max(np.abs(served[key] - ref)) <= 1e-5 * np.max(np.abs(ref)), key


def test_bad_flags_are_named(capsys):
    with pytest.raises(SystemExit) as exit_:
        export.main(["--out", "x.jaxexport"])
    assert exit_.value.code == 2  # A usage error.
    assert "Give exactly one of --workdir, --keras_weights and --timm_weights" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        export.main(["--workdir", "w"])  # No --out.
    assert "--out must have a value" in capsys.readouterr().err
