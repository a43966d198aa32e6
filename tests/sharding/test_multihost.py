"""2 processes x 4 CPU devices on loopback give the loss of 1 process x 8 devices."""

import json
import os
import socket
import subprocess
import sys

from lvr_jax.sharding import multihost_check

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, devices: int, process_id: int, num_processes: int, port: int):
    """`python *args` as process `process_id` of `num_processes` with `devices` CPU devices."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    address = f"127.0.0.1:{port}"
    env.update(JAX_COORDINATOR_ADDRESS=address, JAX_COORDINATOR_BIND_ADDRESS=address,
               JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(process_id))
    return subprocess.Popen([sys.executable, *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_processes(args, num_processes: int = 2, devices: int = 4) -> None:
    """`python *args` on `num_processes` x `devices` on loopback; each must exit 0."""
    port = free_port()
    procs = [launch(args, devices, i, num_processes, port) for i in range(num_processes)]
    for proc in procs:
        finish(proc)


def finish(proc):
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]


def test_two_processes_match_one_process(tmp_path):
    port = free_port()
    args = ["-m", "lvr_jax.sharding.multihost_check", "--out", str(tmp_path / "two.json")]
    procs = [launch(args, 4, i, 2, port) for i in range(2)]
    one = multihost_check.run()  # this process: 1 x 8 simulated devices
    for proc in procs:
        finish(proc)
    two = json.loads((tmp_path / "two.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["devices"] == two["devices"] == 8
    assert abs(two["loss"] - one["loss"]) <= 1e-5 * abs(one["loss"])
    assert abs(two["grad_norm"] - one["grad_norm"]) <= 1e-5 * abs(one["grad_norm"])
