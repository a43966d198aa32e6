"""A `model.init` that is not there is named in one line (exit 2), before anything loads; so is
a rollout server's `--model`."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("make, problem", [
    (lambda p: None, "does not exist"), (lambda p: p.write_text("x"), "is a file, not a folder")])
def test_a_model_init_that_is_no_folder_is_a_usage_error(tmp_path, make, problem):
    from lvr_jax import build
    from lvr_jax.cli import CommandLineError
    from tests.tiny_recipe import tiny_config

    config = tiny_config("sft", str(tmp_path), 1)
    config.model.init = str(tmp_path / "vila")
    make(tmp_path / "vila")
    with pytest.raises(CommandLineError) as error:
        build.build_model(config)
    assert str(error.value) == (
        f"model.init '{tmp_path}/vila' {problem}; pass --config.model.init=<VILA directory> (a "
        "folder holding config.json and llm/, e.g. a training run's model/ export)")


def test_the_tokenizer_names_a_missing_folder():
    from lvr_jax.tokenizer import load_tokenizer

    with pytest.raises(FileNotFoundError, match="^tokenizer folder '/nope/model' does not exist"):
        load_tokenizer("/nope/model")


def test_training_with_a_missing_model_init_exits_2_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "lvr_jax.train", "--config=configs/demo.py:grpo",
                          "--config.model.init=/nope/model", f"--workdir={tmp_path}/run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(
        "lvr_jax.train: error: model.init '/nope/model' does not exist; pass "
        "--config.model.init=<VILA directory>")


@pytest.mark.parametrize("make, problem", [
    (lambda p: None, "does not exist"), (lambda p: p.write_text("x"), "is a file, not a folder"),
    (lambda p: p.mkdir(), "holds no config.json (nor llm/config.json)")])
def test_a_rollout_server_model_that_cannot_be_served_exits_2_in_one_line(tmp_path, make,
                                                                          problem):
    make(tmp_path / "model")
    run = subprocess.run([sys.executable, "-m", "rollout_bridge.server", "--model",
                          str(tmp_path / "model"), "--engine", "transformers", "--shm-mb", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.strip().splitlines() == [
        f"python -m rollout_bridge.server: error: --model {tmp_path}/model {problem}; pass a "
        "Qwen2 directory or a VILA directory (its llm/ is served), e.g. a training run's model/ "
        "export"]
