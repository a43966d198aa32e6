"""scripts/grpo_gradient_agreement.py: the two measures the README's figures are read from."""

import importlib.util
import pathlib

import numpy as np

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "grpo_gradient_agreement.py"


def load_script():
    spec = importlib.util.spec_from_file_location("grpo_gradient_agreement", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cosine_and_sign_agreement_against_their_definitions():
    script = load_script()
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=1000), rng.normal(size=1000)
    assert np.isclose(script.cosine(a, a), 1.0) and np.isclose(script.cosine(a, -a), -1.0)
    assert np.isclose(script.cosine(a, b), np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))
    assert abs(script.cosine(a, b)) < 0.15  # independent directions
    # zeros (frozen parameters) count for neither side
    x, y = np.array([1.0, -2.0, 0.0, 3.0, 4.0]), np.array([2.0, 1.0, 5.0, 0.0, 1.0])
    assert script.sign_agreement(x, y) == 2 / 3
    assert script.sign_agreement(a, a) == 1.0 and script.sign_agreement(a, -a) == 0.0
