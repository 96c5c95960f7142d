"""Checkpoint conversion between ul2lab and other formats: Hugging Face, t5x, Mesh TensorFlow.

    import_hf(hf_dir, output_dir)           HF T5 / Flan-T5 / mT5 / UL2 -> ul2lab checkpoint
    export_hf(checkpoint_dir, output_dir)   ul2lab checkpoint -> HF T5ForConditionalGeneration
    import_t5x(checkpoint_dir, output_dir)  t5x checkpoint (any layout) -> ul2lab checkpoint
    import_mtf(checkpoint_dir, output_dir)  Mesh TensorFlow T5 checkpoint -> ul2lab checkpoint
    export_t5x(checkpoint_dir, output_dir)  ul2lab checkpoint -> t5x MODEL_DIR (tensorstore layout)

An imported checkpoint is a params-only orbax step 0 plus config.json (model config) and the
vocabulary (spiece.model), so training (INITIAL_CHECKPOINT_PATH), evaluation and export need no gin,
and the directory can be copied anywhere.
"""
import os
import shutil
import tempfile
from typing import Optional, Tuple

import jax
import numpy as np
from flax import traverse_util

from ul2lab.errors import UserError
from ul2lab.files import atomic_write
from ul2lab.interop import hf, model_gin, mtf, t5x, t5x_files
from ul2lab.models.config import PRESETS
from ul2lab.train import checkpoints, integrity


def import_hf(hf_dir: str, output_dir: str, vocab_path: Optional[str] = None, overwrite: bool = False) -> str:
    """A Hugging Face T5 / mT5 directory -> a ul2lab checkpoint (params-only step 0 + config.json);
    returns the checkpoint directory. The HF directory's spiece.model is copied into it."""
    out = os.path.abspath(output_dir)
    # refuse before the (possibly long) conversion, and never clobber a config.json of something else
    if not overwrite and (checkpoints.has_checkpoint(out) or
                          os.path.exists(os.path.join(out, checkpoints.CONFIG_FILE))):
        raise UserError(f"{out} already holds a checkpoint; pass --overwrite to replace it, "
                        "or choose another --output_dir")
    if vocab_path is not None and "://" not in vocab_path and not os.path.isfile(vocab_path):
        raise UserError(f"--vocab_path {vocab_path} does not exist; pass a SentencePiece .model file")
    hf_vocab = os.path.join(hf_dir, hf.SPM_FILE)
    if vocab_path is None and os.path.isfile(hf_vocab):
        vocab_path = hf_vocab  # copied into the checkpoint (an HF cache snapshot may be deleted later)
    config, params = hf.load(hf_dir)
    bad = integrity.problems({"params": params})
    if bad:
        raise hf.HFFormatError(f"{hf_dir} cannot be imported: {'; '.join(bad)}; download the model again")
    checkpoints.save_params(out, params, config, step=0, vocab_path=vocab_path, overwrite=overwrite)
    print(f"imported {hf_dir} -> {out} ({config.num_encoder_layers}+{config.num_decoder_layers} layers, "
          f"d_model {config.emb_dim}, vocabulary {vocab_path or 'none recorded'})")
    return out


def export_hf(checkpoint_dir: str, output_dir: str, vocab_path: Optional[str] = None, overwrite: bool = False,
              step: Optional[int] = None, allow_missing_checksums: bool = False) -> str:
    """A ul2lab checkpoint (the latest step, or `step`) -> a transformers T5ForConditionalGeneration
    directory, with tokenizer files when the checkpoint knows its vocabulary; returns output_dir."""
    _, payload = checkpoints.read_config(checkpoint_dir)
    if hf.holds_hf_model(output_dir) and not overwrite:  # before reading params
        raise hf.HFFormatError(f"{output_dir} already holds a Hugging Face model; pass --overwrite "
                               "to replace it, or choose another --output_dir")
    vocab_path = vocab_path or checkpoints.vocabulary_path(checkpoint_dir, payload)  # before reading params
    config, params, _ = checkpoints.load_params(checkpoint_dir, step,  # checked against the step's checksums
                                                allow_missing_checksums=allow_missing_checksums)
    hf.save(config, params, output_dir, vocab_path=vocab_path, overwrite=overwrite,
            extra_ids=payload.get("extra_ids", 100))
    print(f"exported {checkpoint_dir} -> {output_dir}"
          f"{' with tokenizer' if vocab_path else ' (no vocabulary recorded: no tokenizer files)'}")
    return output_dir


# ----------------------------------------------------------------------------- t5x and Mesh TensorFlow

def import_t5x(checkpoint_dir: str, output_dir: str, model: Optional[str] = None, gin_file: Optional[str] = None,
               vocab_path: Optional[str] = None, overwrite: bool = False, with_optimizer_state: bool = False) -> str:
    """A t5x checkpoint (MODEL_DIR or checkpoint_<step>; msgpack, tensorstore or orbax layout) -> a ul2lab
    checkpoint at the same step, written one array at a time; returns the checkpoint directory.

    The model's shape is read from the arrays; activations and dropout from `model` (a preset),
    `gin_file`, or else the config.gin t5x saved in MODEL_DIR. with_optimizer_state: also t5x's
    Adafactor moments, as a whole train state that `ul2lab train` resumes (MODEL_DIR = output_dir)."""
    out = _check_output(output_dir, overwrite)
    vocab_path = _vocab(vocab_path)
    checkpoint = t5x_files.open_checkpoint(checkpoint_dir)
    target = {name[len("target/"):]: a for name, a in checkpoint.arrays.items() if name.startswith("target/")}
    if not target:
        raise t5x_files.T5xFormatError(f"{checkpoint.path} has no optimizer/target parameters (only "
                                       f"{', '.join(sorted(checkpoint.arrays)[:3])}); is it a t5x checkpoint?")
    run_gin = os.path.join(os.path.dirname(checkpoint.path), "config.gin")
    declared, declared_by = _declared_model(model, gin_file, run_gin)
    config = t5x.infer_config(target, checkpoint.path, declared, declared_by)
    params, _ = t5x.import_params(target, config, checkpoint.path)
    opt_state = run = None
    if with_optimizer_state:
        opt_state = t5x.import_adafactor_state(checkpoint.arrays, config, checkpoint.step, checkpoint.path)
        run = {"step": checkpoint.step, "rng": np.asarray(jax.random.PRNGKey(0)).tolist(),
               "mixture_or_task_name": None, "data_batches": 0, "batch_size": None}
    _write_beside(out, overwrite, lambda tmp: checkpoints.save_params(
        tmp, traverse_util.unflatten_dict(params, sep="/"), config, step=checkpoint.step, vocab_path=vocab_path,
        opt_state=opt_state, run=run))
    print(f"imported {checkpoint.path} ({checkpoint.layout}, step {checkpoint.step}) -> {out}: {_summary(config)}; "
          f"activations {'/'.join(config.mlp_activations)} from {declared_by}"
          + ("; with t5x's Adafactor state: train with MODEL_DIR=" + out + " to continue at step "
             f"{checkpoint.step}" if with_optimizer_state else ""))
    return out


def import_mtf(checkpoint_dir: str, output_dir: str, model: Optional[str] = None, gin_file: Optional[str] = None,
               vocab_path: Optional[str] = None, overwrite: bool = False) -> str:
    """A Mesh TensorFlow T5 checkpoint (original T5, T5.1.1, mT5 releases) -> a ul2lab checkpoint at its
    global_step; returns the checkpoint directory. Activations: `model`, `gin_file`, the checkpoint's
    operative_config.gin, or T5's own (one `wi`: ReLU, T5 1.0; `wi_0`/`wi_1`: gated GELU, T5.1.1)."""
    out = _check_output(output_dir, overwrite)
    vocab_path = _vocab(vocab_path)
    arrays, step, prefix = mtf.open_checkpoint(checkpoint_dir)
    declared, declared_by = _declared_model(model, gin_file, os.path.join(os.path.dirname(prefix),
                                                                          mtf.OPERATIVE_GIN))
    config = t5x.infer_config(arrays, prefix, declared, declared_by,
                              default_activations={1: ("relu",), 2: ("gelu", "linear")})
    params, _ = t5x.import_params(arrays, config, prefix)
    _write_beside(out, overwrite, lambda tmp: checkpoints.save_params(
        tmp, traverse_util.unflatten_dict(params, sep="/"), config, step=step, vocab_path=vocab_path))
    print(f"imported {prefix} (step {step}) -> {out}: {_summary(config)}; activations "
          f"{'/'.join(config.mlp_activations)} from {declared_by or 'the MLP kernels (T5 release defaults)'}")
    return out


def export_t5x(checkpoint_dir: str, output_dir: str, step: Optional[int] = None, overwrite: bool = False,
               allow_missing_checksums: bool = False) -> str:
    """A ul2lab checkpoint step -> a t5x MODEL_DIR: checkpoint_<step>/ in t5x's tensorstore layout (params
    only, 2-D attention kernels, unrolled layers) and config.gin with the model's network.T5Config;
    written one array at a time, each checked against the step's checksums as it is read (a mismatch
    leaves output_dir as it was). Returns the checkpoint_<step> directory."""
    out = os.path.abspath(output_dir)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise UserError(f"{out} is not empty; pass --overwrite to replace it, or choose another --output_dir")
    config, step, arrays = checkpoints.param_arrays(checkpoint_dir, step, allow_missing_checksums)
    t5x_arrays = t5x.export_params(arrays)

    def write(tmp):
        t5x_files.write_checkpoint(tmp, step, t5x_arrays)
        atomic_write(os.path.join(tmp, "config.gin"), _t5x_gin(config, checkpoint_dir, step))
    _write_beside(out, overwrite, write, replace_any=True)
    step_dir = os.path.join(out, f"{t5x_files.STEP_PREFIX}{step}")
    print(f"exported {checkpoint_dir} (step {step}) -> {step_dir} ({len(t5x_arrays)} arrays) and "
          f"{os.path.join(out, 'config.gin')}")
    return step_dir


def _declared_model(model: Optional[str], gin_file: Optional[str], run_gin: str) -> Tuple[Optional[dict], str]:
    """(T5Config fields a preset or gin file gives, what gave them): --model, --gin_file, or the run's own
    gin file beside the checkpoint; (None, "") when none."""
    if model is not None and gin_file is not None:
        raise UserError("pass --model or --gin_file, not both")
    if model is not None:
        if model not in PRESETS:
            raise UserError(f"--model {model!r} is not a ul2lab preset; choose one of {sorted(PRESETS)}")
        return PRESETS[model].to_dict(), f"preset {model}"
    if gin_file is not None:
        return model_gin.read(gin_file), f"gin file {gin_file}"
    if os.path.isfile(run_gin):
        return model_gin.read(run_gin), f"the run's {run_gin}"
    return None, ""


def _check_output(output_dir: str, overwrite: bool) -> str:
    out = os.path.abspath(output_dir)
    if not os.path.isdir(out) or not os.listdir(out):
        return out
    if not overwrite:
        raise UserError(f"{out} is not empty; pass --overwrite to replace the checkpoint in it, or choose "
                        "another --output_dir")
    if not (checkpoints.has_checkpoint(out) or os.path.exists(os.path.join(out, checkpoints.CONFIG_FILE))):
        raise UserError(f"{out} holds files that are not a ul2lab checkpoint; --overwrite replaces only a "
                        "checkpoint: choose another --output_dir")
    return out


def _vocab(vocab_path: Optional[str]) -> Optional[str]:
    if vocab_path is None or "://" in vocab_path:
        return vocab_path
    if not os.path.isfile(vocab_path):
        raise UserError(f"--vocab_path {vocab_path} does not exist; pass a SentencePiece .model file "
                        "(or its gs:// path, e.g. gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model)")
    return os.path.abspath(vocab_path)


def _write_beside(out: str, overwrite: bool, write, replace_any: bool = False):
    """Run write(tmp) into a new folder beside `out`, then move it into place: a failed conversion
    leaves `out` as it was (the folder of the failure is removed)."""
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=parent)
    try:
        write(tmp)
        if os.path.isdir(out) and os.listdir(out):
            if not (overwrite or replace_any):
                raise UserError(f"{out} was filled while converting; the conversion is left in {tmp}")
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".old", dir=parent)
            os.rename(out, os.path.join(old, "replaced"))
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            if os.path.isdir(out):
                os.rmdir(out)
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _summary(config) -> str:
    return (f"{config.num_encoder_layers}+{config.num_decoder_layers} layers{' (scanned)' if config.scan_layers else ''}"
            f", d_model {config.emb_dim}, {config.num_heads} heads of {config.head_dim}, MLP {config.mlp_dim}, "
            f"vocabulary {config.vocab_size}, {'tied' if config.logits_via_embedding else 'untied'} head")


def _t5x_gin(config, source: str, step: int) -> str:
    """The model as t5x's examples/t5 network.T5Config (what t5x saves in MODEL_DIR/config.gin)."""
    fields = ["vocab_size", "emb_dim", "num_heads", "num_encoder_layers", "num_decoder_layers", "head_dim",
              "mlp_dim", "mlp_activations", "dropout_rate", "logits_via_embedding", "float32_attention_logits"]
    lines = [f"# Written by `ul2lab export-t5x` from {source} (step {step}): the model of checkpoint_{step}",
             "# as t5x's examples/t5 network.T5Config. ul2lab's own settings that t5x's network fixes:",
             f"#   relative_attention_max_distance = {config.relative_attention_max_distance} (t5x: 128), "
             f"layer_norm_epsilon = {config.layer_norm_epsilon} (t5x: 1e-6),",
             f"#   decoder_norm_use_scale = {config.decoder_norm_use_scale} (t5x: True).",
             "from __gin__ import dynamic_registration", "from t5x.examples.t5 import network", "",
             "network.T5Config:"]
    for field in fields:
        value = getattr(config, field)
        lines.append(f"  {field} = {tuple(value)!r}" if field == "mlp_activations" else f"  {field} = {value!r}")
    lines.append(f"  dtype = {config.dtype!r}")
    return "\n".join(lines) + "\n"
