"""notebooks/inspect_checkpoint.ipynb runs top to bottom against a briefly trained workdir."""

import os

import jax
import nbformat
import pytest
from nbclient import NotebookClient
from test_train import small_config

from xception_jax.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "inspect_checkpoint.ipynb")


@pytest.fixture(scope="module")
def digits_run(digits_data_dir, tmp_path_factory):
    """A workdir of 4 steps of the tiny model on the embedded digits (tests/test_train.py)."""
    workdir = str(tmp_path_factory.mktemp("notebook_run"))
    loop.train_and_evaluate(small_config(digits_data_dir), workdir, devices=jax.devices()[:1])
    return workdir


def test_notebook_executes_top_to_bottom(digits_run, monkeypatch):
    monkeypatch.setenv("XCEPTION_WORKDIR", digits_run)
    # The kernel: this interpreter (jupyter_client runs the 'python3' kernelspec's 'python' as
    # sys.executable), one CPU device, and the session's compilation cache (inherited).
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}},
    )
    client.execute()  # Raises CellExecutionError (with the traceback) on any failing cell.
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert f"workdir: {digits_run}" in text
    assert "top-1 correct:" in text and "'stem': (1, 13, 13, 16)" in text
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 3  # Curves, classified images, feature maps.
