"""The training loop's edges: a checkpoint that does not fit is refused (not taken for
damage), a stop signal saves and resumes, one run per workdir, a failed save stops the run at
once, and values no run can use are refused before any work."""

import json
import os
import resource
import signal
import subprocess
import sys
import time

import psutil
import pytest

from lvr_jax import trainer
from lvr_jax.config import ConfigError
from tests.test_train import ROOT, logged_steps, train_command
from tests.tiny_recipe import config_file


def wait_for(condition, timeout: float = 600.0, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(every)


def alive(processes) -> list:
    """Those of `processes` still running (zombies have ended)."""
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_a_checkpoint_of_another_model_size_is_refused_naming_the_array_and_setting(
        tmp_path, tiny_train_config):
    workdir = str(tmp_path / "run")
    trainer.run(tiny_train_config("sft", 4), workdir)  # checkpoints at steps 2 and 4
    rows = logged_steps(workdir)
    config = tiny_train_config("sft", 6)
    config.model.llm.intermediate_size = 256  # trained with 128
    with pytest.raises(ConfigError) as refused:
        trainer.run(config, workdir)
    message = str(refused.value)
    assert "checkpoint step 4" in message, message
    assert "array trainable.llm.layers.mlp.down_proj.kernel.value is shape (2, 128, 64) " \
        "float32 in the checkpoint and shape (2, 256, 64) float32 in this run" in message, message
    assert "model.llm.intermediate_size is 256 here" in message, message
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    assert not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))
    assert logged_steps(workdir) == rows  # no metrics dropped


def test_values_no_run_can_use_are_refused_before_any_work(tmp_path, tiny_train_config):
    cases = [("optim.lr", -1.0, "optim.lr must be positive"),
             ("train.checkpoint_every", 0, "train.checkpoint_every must be at least 1"),
             ("train.num_steps", 0, "train.num_steps must be at least 1"),
             ("data.num_frames", 0, "data.num_frames must be at least 1")]
    for key, value, message in cases:
        config = tiny_train_config("sft", 2)
        section, name = key.split(".")
        config[section][name] = value
        with pytest.raises(ConfigError, match=message):
            trainer.run(config, str(tmp_path / key))
        assert not os.path.exists(tmp_path / key)
    for generations in (0, 1):
        config = tiny_train_config("grpo", 1)
        config.rl.num_generations = generations
        with pytest.raises(ConfigError, match="rl.num_generations must be at least 2"):
            trainer.run(config, str(tmp_path / "grpo"))


def test_a_mesh_the_devices_cannot_fill_is_refused(tmp_path, tiny_train_config):
    config = tiny_train_config("sft", 2)
    config.mesh.shape = dict(data=1, fsdp=1, sp=3, tp=1)  # 8 devices here
    with pytest.raises(ConfigError, match=r"config.mesh.shape: .* does not divide 8 devices"):
        trainer.run(config, str(tmp_path / "run"))


def test_a_bad_value_on_the_command_line_is_one_line_and_exit_2(tmp_path, synthetic_set):
    command = train_command(tmp_path / "run", synthetic_set, 2) + ["--config.optim.lr=-1"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "lvr_jax.train: error: optim.lr must be positive, got -1.0"]


def test_the_readme_server_command_sets_the_rollout_urls():
    """The README's `--config.rl.rollout.urls='[...]'` (a list on the command line)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    [flag] = [w for w in readme.split() if w.startswith("--config.rl.rollout.urls=")]
    script = ("import sys\nfrom absl import flags\nfrom lvr_jax import train\n"
              "train.define_flags()\nflags.FLAGS(sys.argv)\n"
              "print(list(flags.FLAGS.config.rl.rollout.urls))")
    value = flag.split("=", 1)[1].strip("'")
    out = subprocess.run([sys.executable, "-c", script, "--config=configs/longvila_r1_7b_grpo.py:gpu8",
                          f"--config.rl.rollout.urls={value}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['http://node1:8470', 'http://node2:8470']"


def test_sigterm_saves_the_step_stops_the_workers_and_the_rerun_resumes(tmp_path,
                                                                         synthetic_set):
    workdir = tmp_path / "run"
    extra = ["--config.train.checkpoint_every=100", "--config.data.num_workers=2"]
    run = subprocess.Popen(train_command(workdir, synthetic_set, 40) + extra, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    wait_for(lambda: len(logged_steps(workdir)) >= 2 or run.poll() is not None)
    workers = psutil.Process(run.pid).children(recursive=True)
    assert workers, "the run has data worker processes"
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=600)
    assert run.returncode not in (0, None), err
    last = err.strip().splitlines()[-1]
    step = logged_steps(workdir)[-1]
    assert f"SIGTERM received at step {step}; stopped with a checkpoint of step {step}" in last
    assert "rerun the same command to resume" in last
    assert os.path.isdir(workdir / "checkpoints" / str(step))
    wait_for(lambda: not alive(workers), timeout=30)  # its resource tracker ends last
    rerun = subprocess.run(train_command(workdir, synthetic_set, step + 1) + extra, cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resumed sft from step {step}" in rerun.stderr
    assert logged_steps(workdir) == list(range(1, step + 2))


def test_the_data_workers_of_a_killed_run_exit_with_it(tmp_path, synthetic_set):
    command = train_command(tmp_path / "run", synthetic_set, 400) + ["--config.data.num_workers=2"]
    run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    wait_for(lambda: len(logged_steps(tmp_path / "run")) >= 1 or run.poll() is not None)
    workers = psutil.Process(run.pid).children(recursive=True)
    assert len(workers) >= 2, workers  # the two decoders (and Python's resource tracker)
    run.kill()
    run.wait()
    wait_for(lambda: not alive(workers), timeout=30)


def test_one_run_per_workdir_and_a_killed_run_leaves_no_lock(tmp_path, synthetic_set,
                                                             tiny_train_config):
    workdir = tmp_path / "run"
    recipe = config_file(tmp_path / "recipe.py", "sft", synthetic_set, 400)
    first = subprocess.Popen([sys.executable, "-m", "lvr_jax.train", f"--config={recipe}",
                              f"--workdir={workdir}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(logged_steps(workdir)) >= 1 or first.poll() is not None)
        config = tiny_train_config("sft", 2)
        with pytest.raises(ConfigError, match=f"workdir {workdir} is in use by another run "
                                              f"\\(pid {first.pid} on "):
            trainer.run(config, str(workdir))
    finally:
        first.kill()
        first.wait()
    steps = logged_steps(workdir)
    config = tiny_train_config("sft", steps[-1] + 1)
    trainer.run(config, str(workdir))  # the lock died with its holder
    assert logged_steps(workdir)[-1] == steps[-1] + 1


def test_a_save_that_fails_stops_the_run_at_once_in_one_line(tmp_path, synthetic_set):
    """Files may grow to 64 KiB only (as a full disk, writes beyond fail): the first
    checkpoint (step 10, written in the background) cannot be written, and the run stops
    as soon as that is known, not at the next save (step 20)."""
    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG to the writer, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    workdir = tmp_path / "run"
    command = train_command(workdir, synthetic_set, 20) + ["--config.train.checkpoint_every=10"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         preexec_fn=small_files)
    assert out.returncode not in (0, None)
    [line] = [x for x in out.stderr.replace("\r", "\n").splitlines()
              if x.strip() and not x.startswith("sft:")]
    assert "saving checkpoint step 10 to " in line and "File too large" in line, line
    assert "the latest complete checkpoint is step none" in line, line
    assert 10 <= max(logged_steps(workdir)) < 20, logged_steps(workdir)
    with open(workdir / "sft_metrics.jsonl") as f:
        assert all(json.loads(line) for line in f)
