"""configs/demo.py shrunk so that a training step takes well under a second: the recipe of
the training tests, in process (`conftest.tiny_train_config`) and as a config file that
`python -m lvr_jax.train` reads (`config_file`)."""

import textwrap


def tiny_config(stage: str, data: str, steps: int):
    from lvr_jax.config import demo_config

    c = demo_config(stage, data, steps)
    c.model.llm.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    c.data.update(num_frames=8, batch_size=4)
    c.rl.update(num_generations=4, max_new_tokens=24, update_batch_size=2)
    c.train.update(checkpoint_every=2, keep_checkpoints=10)
    c.drills.steps = 0  # tests/sft/test_option_drills.py runs them
    # every category: the demo's GRPO leaves Spatial out, and the training tests' measured
    # figures (tests/test_demo_learns.py) were taken on all four
    c.data.categories = ()
    c.model.allow_random_init = stage == "grpo"  # tests that set model.init override it
    return c


def config_file(path, stage: str, data: str, steps: int) -> str:
    """Writes a config file of `tiny_config(stage, data, steps)`; returns its path."""
    path.write_text(textwrap.dedent(f"""\
        from tests.tiny_recipe import tiny_config


        def get_config():
            return tiny_config({stage!r}, {data!r}, {steps})
        """))
    return str(path)
