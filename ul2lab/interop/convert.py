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
import re
import shutil
import tempfile
from typing import Optional, Tuple

import jax
import numpy as np
from flax import traverse_util

from ul2lab.errors import UserError
from ul2lab import files
from ul2lab.files import atomic_write
from ul2lab.interop import hf, model_gin, mtf, t5x, t5x_files
from ul2lab.models.config import PRESETS
from ul2lab.train import checkpoints, integrity

T5_EXTRA_IDS = 100  # seqio's sentinels on top of a .model file that has none, as T5 pairs its vocabulary


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
    out = os.path.abspath(output_dir)
    _check_export_target(checkpoint_dir, out, overwrite, hf.is_export_file, "a Hugging Face model")  # before reading params
    vocab_path = vocab_path or checkpoints.vocabulary_path(checkpoint_dir, payload)  # before reading params
    config, params, _ = checkpoints.load_params(checkpoint_dir, step,  # checked against the step's checksums
                                                allow_missing_checksums=allow_missing_checksums)
    _export_into(out, lambda tmp: hf.save(config, params, tmp, vocab_path=vocab_path, overwrite=True,
                                          extra_ids=payload.get("extra_ids", 100)), hf.is_export_file)
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
    run_gin = os.path.join(os.path.dirname(checkpoint.path), t5x_files.RUN_GIN)
    declared, declared_by = _declared_model(model, gin_file, run_gin)
    extra_ids = _flag_extra_ids(vocab_path)
    if vocab_path is None:  # the vocabulary t5x's gin names (export-t5x writes it there too)
        vocab_path, extra_ids = _gin_vocabulary([g for g in (gin_file, run_gin) if g and os.path.isfile(g)])
    config = t5x.infer_config(target, checkpoint.path, declared, declared_by)
    params, _ = t5x.import_params(target, config, checkpoint.path)
    opt_state = run = None
    if with_optimizer_state:
        opt_state = t5x.import_adafactor_state(checkpoint.arrays, config, checkpoint.step, checkpoint.path)
        run = {"step": checkpoint.step, "rng": np.asarray(jax.random.PRNGKey(0)).tolist(),
               "mixture_or_task_name": None, "data_batches": 0, "batch_size": None}

    def write(tmp):
        checkpoints.save_params(tmp, traverse_util.unflatten_dict(params, sep="/"), config, step=checkpoint.step,
                                vocab_path=vocab_path, opt_state=opt_state, run=run)
        if extra_ids is not None:  # seqio's sentinels on top of the .model file's pieces, as the gin said
            checkpoints.write_config(tmp, config, vocab_path, extra_ids=extra_ids)
    _write_beside(out, overwrite, write)
    print(f"imported {checkpoint.path} ({checkpoint.layout}, step {checkpoint.step}) -> {out}: {_summary(config)}; "
          f"activations {'/'.join(config.mlp_activations)} from {declared_by}; vocabulary {vocab_path or 'none recorded'}"
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
    extra_ids = _flag_extra_ids(vocab_path)

    def write(tmp):
        checkpoints.save_params(tmp, traverse_util.unflatten_dict(params, sep="/"), config, step=step,
                                vocab_path=vocab_path)
        if extra_ids is not None:
            checkpoints.write_config(tmp, config, vocab_path, extra_ids=extra_ids)
    _write_beside(out, overwrite, write)
    print(f"imported {prefix} (step {step}) -> {out}: {_summary(config)}; activations "
          f"{'/'.join(config.mlp_activations)} from {declared_by or 'the MLP kernels (T5 release defaults)'}")
    return out


def export_t5x(checkpoint_dir: str, output_dir: str, step: Optional[int] = None, overwrite: bool = False,
               allow_missing_checksums: bool = False) -> str:
    """A ul2lab checkpoint step -> a t5x MODEL_DIR: checkpoint_<step>/ in t5x's tensorstore layout (params
    only, 2-D attention kernels, unrolled layers) and config.gin with the model's network.T5Config;
    written one array at a time, each checked against the step's checksums as it is read (a mismatch
    leaves output_dir as it was). Returns the checkpoint_<step> directory."""
    _, payload = checkpoints.read_config(checkpoint_dir)
    out = os.path.abspath(output_dir)
    _check_export_target(checkpoint_dir, out, overwrite, t5x_files.is_export_entry, "a t5x export")
    vocab_path = checkpoints.vocabulary_path(checkpoint_dir, payload)
    config, step, arrays = checkpoints.param_arrays(checkpoint_dir, step, allow_missing_checksums)
    t5x_arrays = t5x.export_params(arrays)
    # t5x finds the vocabulary through config.gin; a local file travels with the export (import-t5x reads both)
    local = bool(vocab_path) and "://" not in vocab_path
    vocabulary = None if not vocab_path else (os.path.join(out, t5x_files.VOCAB_FILE) if local else vocab_path,
                                              payload.get("extra_ids", 100))

    def write(tmp):
        t5x_files.write_checkpoint(tmp, step, t5x_arrays)
        if local:
            shutil.copyfile(vocab_path, os.path.join(tmp, t5x_files.VOCAB_FILE))
        atomic_write(os.path.join(tmp, t5x_files.RUN_GIN), _t5x_gin(config, checkpoint_dir, step, vocabulary))
    _export_into(out, write, t5x_files.is_export_entry)
    step_dir = os.path.join(out, f"{t5x_files.STEP_PREFIX}{step}")
    print(f"exported {checkpoint_dir} (step {step}) -> {step_dir} ({len(t5x_arrays)} arrays) and "
          f"{os.path.join(out, 'config.gin')}" + (f" naming the vocabulary {vocabulary[0]}" if vocabulary else
                                                  " (no vocabulary recorded)"))
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


def _gin_vocabulary(gin_files) -> Tuple[Optional[str], Optional[int]]:
    """(vocabulary file, extra_ids) the first of `gin_files` binding seqio.SentencePieceVocabulary names; a
    relative or moved file is looked for beside the gin file (an exported MODEL_DIR copied elsewhere)."""
    for gin in gin_files:
        model_file, extra_ids = model_gin.vocabulary(gin)
        if model_file is None:
            continue
        extra_ids = extra_ids or 0  # seqio's default: the .model file's pieces only
        if "://" in model_file:
            return model_file, extra_ids
        folder = os.path.dirname(os.path.abspath(gin))
        for candidate in (os.path.join(folder, model_file), os.path.join(folder, os.path.basename(model_file))):
            if os.path.isfile(candidate):
                return os.path.abspath(candidate), extra_ids
        raise UserError(f"{gin} names the vocabulary {model_file} (seqio.SentencePieceVocabulary."
                        "sentencepiece_model_file), which does not exist here nor beside it; copy the .model file "
                        "beside the gin file, or pass --vocab_path")
    return None, None


def _check_export_target(checkpoint_dir: str, out: str, overwrite: bool, is_export_entry, what: str):
    """Refuse, before anything is read, an --output_dir that is a file, that is (or is inside) the checkpoint
    directory, that holds the checkpoint where the export would replace it, or that holds an export without
    --overwrite."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_dir {out} is a file, not a folder; pass a folder to write {what} into "
                        "(it is created if absent)")
    source = os.path.realpath(checkpoint_dir)
    target = os.path.realpath(out)
    # a folder of its own inside the run is fine (the demo exports to MODEL_DIR/hf); the run's folder itself,
    # or a place inside what the run writes (a step, a file of the run), is not
    inside = os.path.relpath(target, source).split(os.sep)[0] if target.startswith(source + os.sep) else None
    if target == source or (inside is not None and _owned_by_the_run(source, inside)):
        raise UserError(f"--output_dir {out} is {'the' if target == source else 'inside'} "
                        f"{'the checkpoint directory' if target == source else os.path.join(checkpoint_dir, inside)}"
                        f": the export would overwrite or mix with the run's own files (its config.json, steps, "
                        f"vocabulary); choose a folder outside it, e.g. {source}-export, or a new subfolder such as "
                        f"{os.path.join(checkpoint_dir, 'hf')}")
    if source.startswith(target + os.sep) and is_export_entry(os.path.relpath(source, target).split(os.sep)[0]):
        raise UserError(f"--output_dir {out} holds the checkpoint directory {checkpoint_dir} under a name the "
                        "export writes; choose another --output_dir")
    if os.path.isdir(out) and (checkpoints.has_checkpoint(out) or _holds_ul2lab_config(out)):
        raise UserError(f"--output_dir {out} holds a ul2lab checkpoint (another run's config.json and steps), which "
                        f"the export would overwrite; choose a folder of its own for {what}")
    if not overwrite and os.path.isdir(out):
        existing = sorted(name for name in os.listdir(out) if is_export_entry(name))
        if existing:
            raise UserError(f"{out} already holds {what} ({', '.join(existing[:3])}"
                            f"{' ...' if len(existing) > 3 else ''}); pass --overwrite to replace it (other files "
                            "there are kept), or choose another --output_dir")


def _owned_by_the_run(run_dir: str, name: str) -> bool:
    """Whether `name` in a run's folder is the run's own: a step (and orbax's temporary or set-aside steps),
    or any file the run wrote (config.json, metrics.jsonl, the vocabulary, TensorBoard events)."""
    path = os.path.join(run_dir, name)
    return (name.isdigit() or name.startswith("corrupt-") or ".orbax-checkpoint-tmp" in name
            or (os.path.exists(path) and not os.path.isdir(path)))


def _holds_ul2lab_config(directory: str) -> bool:
    try:
        checkpoints.read_config(directory)
        return True
    except checkpoints.CheckpointError:  # none, or a Hugging Face config.json (an earlier export)
        return False


def _export_into(out: str, write, is_export_entry):
    """Run write(tmp) into a new folder beside `out`, then move its files into `out`. One rule for every
    export: the files an export writes (is_export_entry) are replaced, anything else in `out` is kept --
    t5x and Hugging Face users export into folders that also hold their notes, eval results or TensorBoard
    logs, and --overwrite means "replace the export", not "wipe the folder". Nothing in `out` changes
    until the whole export is written and checked; a failure or Ctrl-C leaves `out` as it was."""
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    with files.interrupts_held():  # Ctrl-C stops the writing between arrays (stop_if_interrupted), then cleans up
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=parent)
        try:
            write(tmp)
            files.stop_if_interrupted()
            files.replace_in_folder(tmp, out, is_export_entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _flag_extra_ids(vocab_path: Optional[str]) -> Optional[int]:
    """extra_ids for a --vocab_path, paired as T5 pairs its vocabulary: 0 when the .model file carries its
    sentinel pieces (T5's cc_all.32000.100extra), else 100. Recorded in config.json: without it every reader
    would add 100 sentinels to a file that has them (32,200 ids where the model has 32,128 rows). A remote
    file is not opened here (no network at import time): T5's `.<N>extra` folder name says it."""
    if vocab_path is None:
        return None
    if "://" in vocab_path:
        return 0 if re.search(r"\.\d+extra/[^/]*$", vocab_path) else T5_EXTRA_IDS
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    sp = spm.SentencePieceProcessor(model_file=vocab_path)
    return 0 if sp.id_to_piece(sp.get_piece_size() - 1) == "<extra_id_0>" else T5_EXTRA_IDS


def _vocab(vocab_path: Optional[str]) -> Optional[str]:
    if vocab_path is None or "://" in vocab_path:
        return vocab_path
    if not os.path.isfile(vocab_path):
        raise UserError(f"--vocab_path {vocab_path} does not exist; pass a SentencePiece .model file "
                        "(or its gs:// path, e.g. gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model)")
    return os.path.abspath(vocab_path)


def _write_beside(out: str, overwrite: bool, write):
    """Run write(tmp) into a new folder beside `out`, then move it into place: a failed or interrupted
    conversion leaves `out` as it was (the folder of the failure is removed)."""
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    # Ctrl-C is held while writing (orbax's writer threads cannot take a KeyboardInterrupt) and moving into
    # place (between the renames there would be no checkpoint at all); it then removes the folder of the write
    with files.interrupts_held():
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=parent)
        try:
            write(tmp)
            files.stop_if_interrupted()
            if os.path.isdir(out) and os.listdir(out):
                if not overwrite:
                    raise UserError(f"{out} was filled while converting; choose another --output_dir")
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


def _t5x_gin(config, source: str, step: int, vocabulary: Optional[Tuple[str, int]] = None) -> str:
    """The model as t5x's examples/t5 network.T5Config (what t5x saves in MODEL_DIR/config.gin), and the
    vocabulary (model file, extra_ids) as t5x's gin files bind it: VOCABULARY = @seqio.SentencePieceVocabulary()."""
    fields = ["vocab_size", "emb_dim", "num_heads", "num_encoder_layers", "num_decoder_layers", "head_dim",
              "mlp_dim", "mlp_activations", "dropout_rate", "logits_via_embedding", "float32_attention_logits"]
    lines = [f"# Written by `ul2lab export-t5x` from {source} (step {step}): the model of checkpoint_{step}",
             "# as t5x's examples/t5 network.T5Config. ul2lab's own settings that t5x's network fixes:",
             f"#   relative_attention_max_distance = {config.relative_attention_max_distance} (t5x: 128), "
             f"layer_norm_epsilon = {config.layer_norm_epsilon} (t5x: 1e-6),",
             f"#   decoder_norm_use_scale = {config.decoder_norm_use_scale} (t5x: True).",
             "from __gin__ import dynamic_registration", "import seqio", "from t5x.examples.t5 import network", ""]
    if vocabulary is not None:
        model_file, extra_ids = vocabulary
        lines += ["VOCABULARY = @seqio.SentencePieceVocabulary()",
                  f"seqio.SentencePieceVocabulary.sentencepiece_model_file = {model_file!r}",
                  f"seqio.SentencePieceVocabulary.extra_ids = {extra_ids!r}", ""]
    lines.append("network.T5Config:")
    for field in fields:
        value = getattr(config, field)
        lines.append(f"  {field} = {tuple(value)!r}" if field == "mlp_activations" else f"  {field} = {value!r}")
    lines.append(f"  dtype = {config.dtype!r}")
    return "\n".join(lines) + "\n"
