"""LVR_SKIP_VLLM=1 skips the rollout server tests that use the vLLM engine (where vLLM
cannot be installed), as it skips the other vLLM tests."""

import os
import subprocess
import sys

from tests.rollout_bridge.servers import ROOT


def test_lvr_skip_vllm_skips_the_vllm_engine_server_tests():
    env = {**os.environ, "LVR_SKIP_VLLM": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "tests/rollout_bridge/test_server.py",
                          "-q", "-rs", "-k", "vllm", "-p", "no:cacheprovider"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    assert "LVR_SKIP_VLLM=1" in report and " skipped" in report, report
    assert " passed" not in report and " failed" not in report, report
