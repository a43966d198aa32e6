"""python -m lvr_jax.model.assemble --vision DIR --llm DIR --projector mlp_downsample_2x2_fix --out DIR

A LongVILA to train, from parts: a SigLIP directory (a SiglipVisionModel, or a full
SiglipModel whose text half is dropped), a Qwen2 directory (model and tokenizer) and a
freshly initialised projector become a VILA directory. The tokenizer gains VILA's tokens
(`<vila/sentinel>`, `<image>`, `<vila/video>`); the embedding table (and an untied
lm_head) grows to the new vocabulary, the new tokens' rows set to the mean of the known
ones. Tensors are copied one at a time in their stored dtype; the result is checked to
load here before the command ends.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Iterator

import numpy as np
from flax import nnx

from lvr_jax.model import config as cfg_lib
from lvr_jax.model.checkpoint import check_checkpoint, iter_hf_tensors, write_configs
from lvr_jax.model.config import LongVILAConfig
from lvr_jax.model.projector import Projector
from lvr_jax.model.safetensors_io import SafetensorsDir, write_component
from lvr_jax.model.vila_config import CheckpointError, read_json
from lvr_jax.tokenizer import VIDEO_TOKEN, load_tokenizer

log = logging.getLogger("lvr_jax.model.assemble")
VILA_TOKENS = ("<vila/sentinel>", "<image>", VIDEO_TOKEN)  # in the order VILA adds them
EMBEDDING_TABLES = ("model.embed_tokens.weight", "lm_head.weight")


def _hf_config_dict(config) -> dict:
    """A transformers config as the JSON dict it saves (every field, defaults filled)."""
    return json.loads(config.to_json_string(use_diff=False))


def vision_part(vision_dir: str) -> tuple[dict, Iterator[tuple[str, np.ndarray]]]:
    """(SiglipVisionModel config dict, its tensors as `vision_model.*`) of a SigLIP folder."""
    import transformers

    source = os.path.join(vision_dir, "config.json")
    top = read_json(source)
    is_full = "vision_config" in top  # a SiglipModel: vision and text towers
    if top.get("model_type") not in ("siglip", "siglip_vision_model"):
        raise CheckpointError(f"field 'model_type' of {source!r} is {top.get('model_type')!r}; "
                              "--vision takes a SigLIP folder ('siglip' or 'siglip_vision_model')")
    vision = transformers.SiglipVisionConfig(**(top["vision_config"] if is_full else top))
    vision.architectures = ["SiglipVisionModel"]
    files = SafetensorsDir(vision_dir, "" if is_full else "vision_tower")
    names = [n for n in files.entries if n.startswith("vision_model.")]
    log.info("vision: %d tensors from %s%s", len(names), vision_dir,
             f" (a SiglipModel: {len(files.entries) - len(names)} text tensors dropped)"
             if is_full else "")
    return _hf_config_dict(vision), ((n, files.read(n)) for n in names)


def extended_tokenizer(llm_dir: str):
    """The LLM's tokenizer (transformers) with VILA's tokens added:
    (tokenizer, size before, ids of the added tokens)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(llm_dir)
    known = len(tok)
    missing = [t for t in VILA_TOKENS if t not in tok.get_vocab()]
    tok.add_tokens(missing, special_tokens=True)
    log.info("tokenizer: added %s (%d -> %d tokens)", missing or "nothing", known, len(tok))
    return tok, known, tok.convert_tokens_to_ids(missing)


def extended_table(table_vd: np.ndarray, rows: int, new_ids: list[int],
                   known: int) -> np.ndarray:
    """`table_vd` grown to `rows` rows; the rows of `new_ids` and the grown ones hold the
    mean of the first `known` (the tokenizer's tokens: a padded table's tail is untrained)."""
    mean_d = table_vd[:known].mean(axis=0, dtype=np.float32).astype(table_vd.dtype)
    out = np.empty((rows, table_vd.shape[1]), table_vd.dtype)
    out[:table_vd.shape[0]] = table_vd
    out[table_vd.shape[0]:] = mean_d
    out[new_ids] = mean_d
    return out


def llm_tensors(files: SafetensorsDir, rows: int, new_ids: list[int],
                known: int) -> Iterator[tuple[str, np.ndarray]]:
    """The LLM's tensors as stored, with the embedding table (and lm_head) extended."""
    for name in files.entries:
        tensor = files.read(name)
        if name in EMBEDDING_TABLES:
            tensor = extended_table(tensor, rows, new_ids, known)
            log.info("llm: %s %s -> %s rows", name, files.entries[name][1][0], rows)
        yield name, tensor


class _ProjectorOnly(nnx.Module):
    """A fresh projector under the attribute names `iter_hf_tensors` maps to layers.{i}."""

    def __init__(self, config: LongVILAConfig, seed: int):
        self.config = config
        self.mm_projector = Projector(config.projector_type, config.vision.hidden_size,
                                      config.llm.hidden_size, rngs=nnx.Rngs(seed))


def projector_tensors(config: LongVILAConfig, seed: int, dtype: str):
    """A freshly initialised projector (seeded) as `layers.{i}.*` tensors in `dtype`."""
    fresh = _ProjectorOnly(config, seed)
    return ((name, t) for _, name, t in iter_hf_tensors(fresh, ("mm_projector",), dtype))


def _llm_config(llm_dir: str, vocab_rows: int) -> dict:
    import transformers

    source = os.path.join(llm_dir, "config.json")
    model_type = read_json(source).get("model_type")
    if model_type != "qwen2":
        raise CheckpointError(f"field 'model_type' of {source!r} is {model_type!r}; --llm takes "
                              "a Qwen2 folder ('qwen2')")
    llm = transformers.Qwen2Config.from_pretrained(llm_dir)
    llm.vocab_size = vocab_rows
    return _hf_config_dict(llm)


def _stored_dtype(files: SafetensorsDir) -> str:
    """The dtype the LLM's embedding table is stored in: the projector's too."""
    stored = files.dtypes.get("model.embed_tokens.weight")
    return {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(stored, "float32")


def assemble(vision_dir: str, llm_dir: str, out: str, *,
             projector_type: str = "mlp_downsample_2x2_fix", seed: int = 0,
             max_shard_bytes: int = 4 << 30) -> LongVILAConfig:
    """Writes a VILA directory at `out` from the parts; returns its (checked) config."""
    if projector_type not in cfg_lib.PROJECTOR_TYPES:
        raise CheckpointError(f"projector {projector_type!r} is not one of "
                              f"{', '.join(cfg_lib.PROJECTOR_TYPES)}")
    vision_cfg, vision_tensors = vision_part(vision_dir)
    tok, known, new_ids = extended_tokenizer(llm_dir)
    llm_files = SafetensorsDir(llm_dir)
    rows = max(read_json(os.path.join(llm_dir, "config.json")).get("vocab_size", 0), len(tok))
    llm_cfg = _llm_config(llm_dir, rows)
    config = _config(vision_cfg, llm_cfg, projector_type, os.path.join(vision_dir, "config.json"),
                     os.path.join(llm_dir, "config.json"))
    write_component(os.path.join(out, "vision_tower"), vision_tensors, max_shard_bytes)
    write_component(os.path.join(out, "llm"), llm_tensors(llm_files, rows, new_ids, known),
                    max_shard_bytes)
    dtype = _stored_dtype(llm_files)
    write_component(os.path.join(out, "mm_projector"), projector_tensors(config, seed, dtype),
                    max_shard_bytes)
    log.info("projector: %s, fresh (seed %d), %s", projector_type, seed, dtype)
    tok.save_pretrained(os.path.join(out, "llm"))
    write_configs(out, _with_token_ids(config, out), llm_cfg, vision_cfg)
    checked = check_checkpoint(out)
    log.info("wrote %s: %d tokens per frame; it loads with lvr_jax.model.load_pretrained", out,
             checked.tokens_per_frame)
    return checked


def _config(vision_cfg: dict, llm_cfg: dict, projector_type: str, vision_source: str,
            llm_source: str) -> LongVILAConfig:
    try:
        vision = cfg_lib.siglip_from_hf(vision_cfg, source=repr(vision_source))
        llm = cfg_lib.qwen2_from_hf(llm_cfg, source=repr(llm_source))
    except cfg_lib.HFConfigError as error:
        raise CheckpointError(str(error)) from None
    return LongVILAConfig(vision=vision, llm=llm, projector_type=projector_type)


def _with_token_ids(config: LongVILAConfig, out: str) -> LongVILAConfig:
    """The config with the placeholder and "\\n" ids of the tokenizer written to `out`."""
    try:
        tok = load_tokenizer(os.path.join(out, "llm"))
    except (KeyError, ValueError) as error:  # a token this project needs, or "\n" in one
        raise CheckpointError(f"the tokenizer of --llm cannot serve a LongVILA: {error}") from None
    return config.replace(video_token_id=tok.video_id, newline_token_id=tok.newline_id)


def define_flags() -> None:
    """The entrypoint's flags; defined only when run, so that importing this module is free."""
    from absl import flags

    flags.DEFINE_string("vision", None, "a SigLIP folder: SiglipVisionModel or SiglipModel")
    flags.DEFINE_string("llm", None, "a Qwen2 folder: Qwen2ForCausalLM and its tokenizer")
    flags.DEFINE_enum("projector", "mlp_downsample_2x2_fix", list(cfg_lib.PROJECTOR_TYPES),
                      "the projector to initialise")
    flags.DEFINE_string("out", None, "the VILA folder to write (must not hold files)")
    flags.DEFINE_integer("seed", 0, "seed of the projector's initialisation")
    for name in ("vision", "llm", "out"):
        flags.mark_flag_as_required(name)


def main(argv) -> None:
    from absl import flags

    from lvr_jax.cli import CommandLineError

    if len(argv) > 1:
        raise CommandLineError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    for name in ("vision", "llm"):
        if not os.path.isfile(os.path.join(getattr(f, name), "config.json")):
            raise CommandLineError(f"--{name} {getattr(f, name)!r} is not a folder with a "
                                   "config.json")
    if os.path.isdir(f.out) and os.listdir(f.out):
        raise CommandLineError(f"--out {f.out!r} already holds files; name a new folder")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        assemble(f.vision, f.llm, f.out, projector_type=f.projector, seed=f.seed)
    except CheckpointError as error:
        raise CommandLineError(str(error)) from None


if __name__ == "__main__":
    from lvr_jax.cli import run_app

    run_app(main, define_flags)
