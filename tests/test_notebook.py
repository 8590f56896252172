"""The Colab quickstart: its install cell's choices, and a run top to bottom on CPU with the
tiny config (a short run)."""

import ast
import importlib.util
import json
import pathlib
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "colab" / "engram_quickstart.ipynb"


def _code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def _install_cell(notebook) -> str:
    (cell,) = [c for c in _code_cells(notebook) if "def install(" in c.source]
    return cell.source


@pytest.fixture
def install(monkeypatch, tmp_path):
    """The install cell's `install`, with pip calls recorded instead of run."""
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda args, **kwargs: calls.append(args))
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(_install_cell(nbformat.read(NOTEBOOK, as_version=4)), namespace)  # noqa: S102
    assert calls == []  # engram_jax is importable here, and nothing was set
    return namespace["install"], calls


def test_install_cell_takes_a_repository_url(install):
    run, calls = install
    run("https://github.com/someone/engram-jax", "")
    run("git+https://github.com/someone/engram-jax@v1", "")
    run("https://example.org/engram-jax-main.zip", "")
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    assert calls == [pip + ["git+https://github.com/someone/engram-jax"],
                     pip + ["git+https://github.com/someone/engram-jax@v1"],
                     pip + ["https://example.org/engram-jax-main.zip"]]


def test_install_cell_takes_an_uploaded_wheel_or_zip(install, tmp_path):
    run, calls = install
    (tmp_path / "engram_jax-0.1.0-py3-none-any.whl").write_bytes(b"PK")
    run("", "engram_jax-0.1.0-py3-none-any.whl")
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", "engram_jax-0.1.0-py3-none-any.whl"]]
    with pytest.raises(FileNotFoundError, match="'checkout.zip' is not a file in .*upload"):
        run("", "checkout.zip")
    with pytest.raises(ValueError, match="not both"):
        run("git+https://github.com/someone/engram-jax", "engram_jax-0.1.0-py3-none-any.whl")


def test_install_cell_says_what_to_set_when_given_nothing(install, monkeypatch):
    run, calls = install
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "engram_jax" else real_find_spec(name, *a))
    with pytest.raises(RuntimeError, match="set REPO_URL .* set PACKAGE"):
        run("", "")
    assert calls == []


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_QUICKSTART_STEPS", "12")
    monkeypatch.setenv("ENGRAM_QUICKSTART_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("ENGRAM_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as on a plain machine
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    cells = _code_cells(notebook)
    text = ["".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("name") == "stdout")
            for cell in cells]
    assert "already importable: nothing to install" in text[0]  # the checkout, not a download
    outputs = [o for cell in cells for o in cell.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no gate picture was shown"
    assert (tmp_path / "gates.png").stat().st_size > 5000
    assert (tmp_path / "run" / "checkpoints" / "12").is_dir()
    # The restored model's validation loss is the one training logged at step 12 (printed
    # rounded to 4 decimals), so the notebook trained the steps it was told and restored them.
    (restore,) = [t for cell, t in zip(cells, text) if "Trained(WORKDIR)" in cell.source]
    printed = ast.literal_eval(restore.splitlines()[0])
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (final,) = [m for m in logged if "val_loss" in m and m["step"] == 12]
    assert printed["val_loss"] == pytest.approx(final["val_loss"], abs=5e-5)
