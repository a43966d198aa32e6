"""`train.run` on 8 (simulated) devices with the sequence split over sp: the frame-parallel
encoder on the path, and the parameters of the single-device run at the end."""

import jax
import numpy as np
import pytest
from flax import nnx

from lvr_jax import train
from lvr_jax.metrics import read_metrics
from lvr_jax.model import load_pretrained
from lvr_jax.sharding import frames as frames_lib


def llm_params(model_dir):
    model = load_pretrained(model_dir)
    return {jax.tree_util.keystr(p): np.asarray(v, np.float64) for p, v in
            jax.tree_util.tree_leaves_with_path(nnx.state(model.llm, nnx.Param))}


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_three_steps_on_an_sp_mesh_end_where_one_device_ends(tiny_train_config, tmp_path,
                                                            monkeypatch, stage):
    sharded_calls = []
    for fn in ("encode_video_sharded", "tower_features_sharded"):
        real = getattr(frames_lib, fn)
        monkeypatch.setattr(frames_lib, fn, lambda *a, real=real, **k: (
            sharded_calls.append(a[1].shape), real(*a, **k))[1])
    params, rows = {}, {}
    for name, sp in (("one device", 1), ("sp=8", 8)):
        config = tiny_train_config(stage, 3)
        config.mesh.shape.update(data=1, fsdp=1, sp=sp, tp=1)
        config.eval.every = 0
        workdir = str(tmp_path / name.replace(" ", "_").replace("=", ""))
        train.run(config, workdir)
        params[name] = llm_params(f"{workdir}/model")
        rows[name] = read_metrics(f"{workdir}/{stage}_metrics.jsonl")
        assert bool(sharded_calls) == (sp > 1), "the mesh run must take the frame-parallel encoder"
    keys = (("loss", "grad_norm") if stage == "sft" else
            ("response_length", "entropy", "logprob_mismatch", "grad_norm", "kl"))
    for one, mesh in zip(rows["one device"], rows["sp=8"]):  # the same samples, step by step
        for k in keys:
            assert mesh[k] == pytest.approx(one[k], rel=1e-3, abs=1e-5), (k, one["step"])
    if stage == "grpo":
        # GRPO's gradients are near zero for many weights (e.g. biases at ~1e-6), where Adam
        # turns the sharded sums' rounding into full-size steps of either sign: the same
        # samples, entropy, KL and gradient norm per step above are what must agree
        return
    for k, want in params["one device"].items():
        got = params["sp=8"][k]
        assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want), k
