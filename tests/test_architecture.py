"""The import rules of docs/architecture.md, held by the code itself: the packages walk their
own modules (and the benchmarks' and scripts' files), read every import at any depth (inside
functions too) and check each against the layers.

Layers, from the bottom: a module imports the project only from lower layers or its own
group; nothing imports an entrypoint (`lvr_jax.train`, `lvr_jax.demo`, `python -m
lvr_jax.eval`) or the tests; nothing imports JAX's private `jax._src`.
"""

import ast
import pathlib
import pkgutil

import pytest

import lvr_jax
import rollout_bridge

ROOT = pathlib.Path(__file__).resolve().parents[1]

# group -> layer. A group is a subpackage or module of lvr_jax, or a top-level folder.
LAYERS = {
    "lvr_jax.kernels": 0, "lvr_jax.sampling": 0, "lvr_jax.tokenizer": 0, "lvr_jax.cli": 0,
    "lvr_jax.metrics": 0, "lvr_jax.checkpointing": 0, "lvr_jax.training": 0, "lvr_jax.flops": 0,
    "lvr_jax.data": 1, "lvr_jax.model": 1,
    "lvr_jax.sharding": 2,
    "lvr_jax.config": 3, "rollout_bridge": 3,
    "lvr_jax.rl": 4, "lvr_jax.sft": 4, "lvr_jax.datagen": 4,
    "lvr_jax.stages": 5,
    "lvr_jax.build": 6, "lvr_jax.memory_report": 6,
    "lvr_jax.eval": 7,
    "lvr_jax.trainer": 8,
    "configs": 8,  # recipes: read by benchmarks and scripts
    "lvr_jax.train": 9, "lvr_jax.demo": 9, "benchmarks": 9, "scripts": 9,
}
ENTRYPOINTS = ("lvr_jax.train", "lvr_jax.demo", "lvr_jax.eval.__main__",
               "lvr_jax.datagen.__main__", "rollout_bridge.server")
PROJECT = ("lvr_jax", "rollout_bridge", "benchmarks", "scripts", "configs", "tests")


def group(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "lvr_jax" and len(parts) > 1 else parts[0]


def package_modules() -> dict[str, pathlib.Path]:
    """Every module of lvr_jax and rollout_bridge (walked as packages), and every file of
    benchmarks/, scripts/ and configs/: name -> path."""
    found = {}
    for package in (lvr_jax, rollout_bridge):
        found[package.__name__] = pathlib.Path(package.__file__)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            spec = info.module_finder.find_spec(info.name)
            found[info.name] = pathlib.Path(spec.origin)
    for folder in ("benchmarks", "scripts", "configs"):
        for path in (ROOT / folder).rglob("*.py"):
            found[".".join(path.relative_to(ROOT).with_suffix("").parts)] = path
    return found


def imports_of(name: str, path: pathlib.Path) -> set[str]:
    """The modules `path` imports, anywhere in it (`from a import b` counts `a` and `a.b`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


MODULES = package_modules()
EDGES = {name: imports_of(name, path) for name, path in MODULES.items()}


def test_the_walk_finds_the_layers_of_every_module():
    assert {"lvr_jax.model.qwen2", "lvr_jax.rl.learner", "rollout_bridge.server",
            "benchmarks.recipe_memory"} <= set(MODULES)
    unplaced = sorted({group(m) for m in MODULES} - set(LAYERS) - {"lvr_jax"})
    assert not unplaced, f"modules with no layer in LAYERS: {unplaced}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    mine = group(module)
    wrong = sorted(t for t in EDGES[module]
                   if t.split(".")[0] in PROJECT and group(t) not in (mine, "lvr_jax")
                   and LAYERS.get(group(t), 99) >= LAYERS[mine])
    assert not wrong, f"{module} imports {wrong}, which are not below its layer"


def test_the_model_never_imports_sharding():
    wrong = {m: sorted(t for t in ts if t.startswith("lvr_jax.sharding"))
             for m, ts in EDGES.items() if m.startswith("lvr_jax.model")}
    assert not any(wrong.values()), wrong


def test_nothing_imports_an_entrypoint_or_the_tests():
    wrong = {m: sorted(t for t in ts if t.split(".")[0] == "tests" or t in ENTRYPOINTS)
             for m, ts in EDGES.items()}
    assert not any(wrong.values()), {m: w for m, w in wrong.items() if w}


def test_nothing_imports_jax_private_modules():
    wrong = {m: sorted(t for t in ts if t == "jax._src" or t.startswith("jax._src."))
             for m, ts in EDGES.items()}
    assert not any(wrong.values()), {m: w for m, w in wrong.items() if w}


def test_the_checks_catch_what_they_forbid(tmp_path):
    """A module written to break each rule is caught by the same readers."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from lvr_jax.sharding import mesh\n    import jax._src.core\n"
                   "    from tests.rollout_bridge import servers\n    from lvr_jax import train\n")
    found = imports_of("lvr_jax.model.bad", bad)
    assert {"lvr_jax.sharding", "jax._src.core", "tests.rollout_bridge", "lvr_jax.train"} <= found
    assert LAYERS[group("lvr_jax.sharding.mesh")] >= LAYERS[group("lvr_jax.model.bad")]
