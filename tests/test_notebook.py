"""notebooks/quickstart.ipynb runs top to bottom on a shortened demo (nbclient, real kernel)."""

import pathlib
import shutil

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def shortened(notebook, workdir) -> None:
    """Overrides the parameters cell's values, the way papermill injects them."""
    [index] = [i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])]
    overrides = (f"WORKDIR = {str(workdir)!r}\nVIDEOS = 30\nDRILL_STEPS = 2\nSFT_STEPS = 3\n"
                 "GRPO_STEPS = 2\nEVAL_LIMIT = 4")
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(overrides))


def outputs_text(notebook) -> str:
    return "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))


def test_quickstart_notebook_runs_top_to_bottom(tmp_path, shortened_demo):
    """On a copy of the shortened demo's run: its data is reused and both stages resume from
    their final checkpoints (the demo test trains them), then export, evaluate and plot."""
    shutil.copytree(shortened_demo[0], tmp_path / "run")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    shortened(notebook, tmp_path / "run")
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    text = outputs_text(notebook)
    difference = float(text.split("max |JAX - transformers| logits:")[1].split()[0])
    assert difference < 1e-4, difference
    for produced in ("eval/results.md", "accuracy.png", "grpo/model/llm/model.safetensors",
                     "sft/sft_curves.png", "grpo/grpo_curves.png"):
        assert (tmp_path / "run" / produced).exists(), produced
