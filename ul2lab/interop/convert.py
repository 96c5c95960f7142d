"""Checkpoint conversion between ul2lab and other formats: Hugging Face T5 directories today.

    import_hf(hf_dir, output_dir)          HF T5 / Flan-T5 / mT5 / UL2 -> ul2lab checkpoint
    export_hf(checkpoint_dir, output_dir)  ul2lab checkpoint -> HF T5ForConditionalGeneration

An imported checkpoint is a params-only orbax step 0 plus config.json (model config) and the
vocabulary (spiece.model), so training (INITIAL_CHECKPOINT_PATH), evaluation and export need no gin,
and the directory can be copied anywhere.
"""
import os
from typing import Optional

from ul2lab.errors import UserError
from ul2lab.interop import hf
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
              step: Optional[int] = None) -> str:
    """A ul2lab checkpoint (the latest step, or `step`) -> a transformers T5ForConditionalGeneration
    directory, with tokenizer files when the checkpoint knows its vocabulary; returns output_dir."""
    _, payload = checkpoints.read_config(checkpoint_dir)
    if hf.holds_hf_model(output_dir) and not overwrite:  # before reading params
        raise hf.HFFormatError(f"{output_dir} already holds a Hugging Face model; pass --overwrite "
                               "to replace it, or choose another --output_dir")
    vocab_path = vocab_path or checkpoints.vocabulary_path(checkpoint_dir, payload)  # before reading params
    config, params, _ = checkpoints.load_params(checkpoint_dir, step)  # checked against the step's checksums
    hf.save(config, params, output_dir, vocab_path=vocab_path, overwrite=overwrite,
            extra_ids=payload.get("extra_ids", 100))
    print(f"exported {checkpoint_dir} -> {output_dir}"
          f"{' with tokenizer' if vocab_path else ' (no vocabulary recorded: no tokenizer files)'}")
    return output_dir
