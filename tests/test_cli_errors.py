"""Command-line mistakes end in one line and exit 2; a GRPO run without weights is refused."""

import pathlib
import subprocess
import sys

import pytest

from lvr_jax.config import ConfigError, base_config
from lvr_jax.rl.stage import check_model_init
from lvr_jax.stages import stage_of

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_train(*args, tmp_path):
    return subprocess.run([sys.executable, "-m", "lvr_jax.train", *args,
                           f"--workdir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_usage_error(out, message):
    output = out.stdout + out.stderr
    assert out.returncode == 2, output[-3000:]
    assert out.stderr.strip() == message, output[-3000:]
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--config=configs/demo.py:sft", "--config.optim.lrr=1"],
     "lvr_jax.train: error: unknown config key optim.lrr (did you mean optim.lr?)"),
    (["--config=configs/demo.py:grpo", "--config.modle.init=x"],
     "lvr_jax.train: error: unknown config key modle.init (did you mean model.init?)"),
    (["--config=configs/nope.py"], "lvr_jax.train: error: config file configs/nope.py not found"),
    (["--config=configs/nope.py:sft", "--config.optim.lr=1"],
     "lvr_jax.train: error: config file configs/nope.py not found"),
    (["--config=configs/demo.py:sft", "--workdri=x"],
     "lvr_jax.train: error: Unknown command line flag 'workdri'. Did you mean: workdir ?"),
])
def test_a_bad_flag_or_config_is_one_line_and_exit_2(tmp_path, args, message):
    assert_usage_error(run_train(*args, tmp_path=tmp_path), message)
    assert not (tmp_path / "run").exists()


def test_help_still_exits_0(tmp_path):
    out = run_train("--helpshort", tmp_path=tmp_path)
    assert out.returncode == 0 and "--workdir" in out.stdout + out.stderr


ENTRYPOINT = """
from ml_collections import config_flags
from lvr_jax.cli import run_app

def define_flags():
    config_flags.DEFINE_config_file("config", "configs/demo.py:sft")

run_app(lambda argv: print("ran"), define_flags)
"""


def test_an_override_of_the_default_config_file_is_checked_when_flags_are_defined():
    # Without --config, ml_collections parses the default file and overrides at definition.
    out = subprocess.run([sys.executable, "-c", ENTRYPOINT, "--config.optim.lrr=1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert_usage_error(out, "-c: error: unknown config key optim.lrr (did you mean optim.lr?)")


GRPO_ENTRYPOINT = """
from lvr_jax.cli import run_app
from lvr_jax.config import base_config
from lvr_jax.rl.stage import check_model_init

def main(argv):
    config = base_config()
    config.stage = "grpo"
    check_model_init(config)

run_app(main)
"""


def test_a_config_error_from_main_is_one_line_and_exit_2():
    out = subprocess.run([sys.executable, "-c", GRPO_ENTRYPOINT], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.startswith("-c: error: stage 'grpo' has no model.init")
    assert len(out.stderr.strip().splitlines()) == 1


def grpo_config(init="", allow_random_init=False):
    config = base_config()
    config.stage = "grpo"
    config.model.update(init=init, allow_random_init=allow_random_init)
    return config


def test_grpo_without_init_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"stage 'grpo' has no model.init, so it would train a "
                                          r"randomly initialised 'tiny' model: pass "
                                          r"--config.model.init=.*allow_random_init=True"):
        check_model_init(grpo_config())


@pytest.mark.parametrize("config", [
    grpo_config(init="runs/demo/sft/model"), grpo_config(allow_random_init=True), base_config()])
def test_grpo_with_init_or_consent_and_sft_from_scratch_pass(config):
    stage_of(config).check(config)
