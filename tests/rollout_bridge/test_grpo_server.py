"""GRPO with the server backend: sampling with top-p on two servers agrees with the trainer;
a killed rollout server is waited for, or the run stops with a checkpoint and a message
naming its URL."""

import json
import os
import signal
import threading
import time

import httpx2
import pytest

from lvr_jax import build, trainer
from rollout_bridge import export
from rollout_bridge.launch import running_server, start_server, stop_server
from rollout_bridge.launch import free_port


def server_config(tiny_train_config, url, steps, wait_s):
    config = tiny_train_config("grpo", steps)
    config.rl.rollout.update(backend="server", urls=[url], wait_s=wait_s, backoff_s=0.2,
                             timeout_s=60.0)
    config.train.export = False
    return config


@pytest.fixture
def llm_dir(tiny_train_config, tmp_path):
    tokenizer, model = build.build_model(tiny_train_config("grpo", 1))
    return export.export_dir(model, str(tmp_path / "llm"), tokenizer)


def steps_logged(workdir) -> int:
    path = os.path.join(workdir, "grpo_metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return max((json.loads(line)["step"] for line in f if line.strip()), default=0)


def metrics_rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "grpo_metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_top_p_sampling_on_two_servers_matches_the_trainer_with_the_kl_term_on(
        tiny_train_config, llm_dir, tmp_path):
    servers = [start_server(llm_dir, "transformers", log_dir=str(tmp_path)) for _ in range(2)]
    workdir = str(tmp_path / "run")
    try:
        config = server_config(tiny_train_config, servers[0].url, 2, wait_s=60)
        config.rl.rollout.urls = [s.url for s in servers]
        config.rl.update(temperature=0.9, top_p=0.8, kl_coef=1e-2)
        trainer.run(config, workdir)
        healths = [httpx2.get(s.url + "/health").json() for s in servers]
    finally:
        for server in servers:
            stop_server(server)
    rows = [r for r in metrics_rows(workdir) if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:  # the engines' log-probs are the trainer's, step after step
        assert row["logprob_mismatch"] < 1e-4 and abs(row["ppl_ratio"] - 1) < 1e-4, row
        assert 0 <= row["kl"] < 1.0 and row["finite"] == 1.0, row
    assert rows[1]["kl"] > 0  # the second step's policy has moved from the reference
    assert [h["version"] for h in healths] == [2, 2]
    assert all(h["embeddings"]["entries"] > 0 for h in healths)  # prompts went to both


def test_one_step_off_policy_trains_each_batch_one_update_after_its_weights(
        tiny_train_config, llm_dir, tmp_path):
    workdir = str(tmp_path / "run")
    with running_server(llm_dir, "transformers", log_dir=str(tmp_path)) as server:
        config = server_config(tiny_train_config, server.url, 3, wait_s=60)
        config.rl.update(off_policy_steps=1, rollout_correction="token-tis", temperature=1.0)
        trainer.run(config, workdir)
        health = httpx2.get(server.url + "/health").json()
    rows = [r for r in metrics_rows(workdir) if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the first batch waits for its own rollout; later ones were generated one update earlier
    assert [r["rollout_staleness"] for r in rows] == [0, 1, 1]
    assert rows[0]["logprob_mismatch"] < 1e-4  # same weights: engine and trainer agree
    assert all(0 <= r["corrected_tokens"] <= 1 and r["finite"] == 1.0 for r in rows)
    assert health["version"] == 3  # the weights before the last update generated batch 4


@pytest.mark.parametrize("off_policy_steps", [0, 1])
def test_run_recovers_when_a_killed_server_restarts(tiny_train_config, llm_dir, tmp_path,
                                                    off_policy_steps):
    port, workdir = free_port(), str(tmp_path / "run")
    config = server_config(tiny_train_config, f"http://127.0.0.1:{port}", 4, wait_s=180)
    # off-policy: the kill lands while the next batch is generating beside an update
    config.rl.off_policy_steps = off_policy_steps
    first = start_server(llm_dir, "transformers", port=port, log_dir=str(tmp_path))
    result = {}
    runner = threading.Thread(target=lambda: result.update(trainer.run(config, workdir)))
    runner.start()
    try:
        deadline = time.monotonic() + 300
        while steps_logged(workdir) < 1 and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert steps_logged(workdir) >= 1, "the run made no step with the server up"
        stop_server(first, signal.SIGKILL)
        time.sleep(2)  # the trainer is now retrying against a dead port
        second = start_server(llm_dir, "transformers", port=port, log_dir=str(tmp_path / ".."))
        runner.join(600)
        assert not runner.is_alive()
        health = httpx2.get(second.url + "/health").json()
    finally:
        for s in ("first", "second"):
            if s in locals():
                stop_server(locals()[s])
    assert steps_logged(workdir) == 4 and result["response_length"] > 0
    assert health["version"] == 4  # weights of the last rollout's step pushed to the new process


def test_server_that_never_returns_stops_the_run_with_a_checkpoint(tiny_train_config, llm_dir,
                                                                   tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = server_config(tiny_train_config, url, 6, wait_s=3)
    config.train.checkpoint_every = 100
    workdir = str(tmp_path / "run")
    with running_server(llm_dir, "transformers", port=port, log_dir=str(tmp_path)) as server:
        killer = threading.Thread(target=lambda: (
            _wait_for(lambda: steps_logged(workdir) >= 1), stop_server(server, signal.SIGKILL)))
        killer.start()
        with pytest.raises(SystemExit, match=f"rollout server {url} did not answer.*"
                                             "stopped with a checkpoint"):
            trainer.run(config, workdir)
        killer.join()
    step = steps_logged(workdir)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))


def _wait_for(condition, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
