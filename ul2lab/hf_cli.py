"""`ul2lab import-hf` and `ul2lab export-hf`: Hugging Face T5 directories <-> ul2lab checkpoints.

    ul2lab import-hf --hf_dir ~/flan-t5-base --output_dir ckpt/flan_t5_base
    ul2lab export-hf --checkpoint_dir ckpt/run1 --output_dir hf/run1

An imported checkpoint is a params-only orbax step 0 plus config.json (model config and
vocabulary path), so training (INITIAL_CHECKPOINT_PATH), evaluation and export need no gin.
"""
import os
import shutil

from ul2lab.cli import UserError


def add_parser(subparsers):
    p = subparsers.add_parser(
        "import-hf", help="convert a Hugging Face T5 / mT5 directory into a ul2lab checkpoint",
        description="Convert a Hugging Face T5 / Flan-T5 / mT5 / UL2 directory (config.json + "
                    "model.safetensors or pytorch_model.bin) into a ul2lab checkpoint directory.")
    p.add_argument("--hf_dir", required=True, help="folder written by save_pretrained (or a hub snapshot)")
    p.add_argument("--output_dir", required=True, help="checkpoint directory to create")
    p.add_argument("--vocab_path", default=None,
                   help="SentencePiece model to record in the checkpoint (default: the HF dir's "
                        "spiece.model, copied into the checkpoint directory)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --output_dir")
    p.set_defaults(func=import_hf)

    p = subparsers.add_parser(
        "export-hf", help="write a ul2lab checkpoint as a Hugging Face T5 directory",
        description="Write the latest step of a ul2lab checkpoint as a transformers "
                    "T5ForConditionalGeneration directory (config.json, model.safetensors, "
                    "generation_config.json, and tokenizer files when the checkpoint knows its vocabulary).")
    p.add_argument("--checkpoint_dir", required=True,
                   help="a ul2lab checkpoint directory (MODEL_DIR of a run, or import-hf output)")
    p.add_argument("--output_dir", required=True, help="folder to write the Hugging Face model to")
    p.add_argument("--vocab_path", default=None,
                   help="SentencePiece model for the tokenizer files (default: the checkpoint's vocab_path)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --output_dir")
    p.set_defaults(func=export_hf)


def import_hf(args) -> int:
    from ul2lab import checkpoints, hf

    out = os.path.abspath(args.output_dir)
    # refuse before the (possibly long) conversion, and never clobber a config.json of something else
    if not args.overwrite and (checkpoints.has_checkpoint(out) or
                               os.path.exists(os.path.join(out, checkpoints.CONFIG_FILE))):
        raise UserError(f"{out} already holds a checkpoint; pass --overwrite to replace it, "
                        "or choose another --output_dir")
    vocab_path = args.vocab_path
    if vocab_path is not None and "://" not in vocab_path and not os.path.isfile(vocab_path):
        raise UserError(f"--vocab_path {vocab_path} does not exist; pass a SentencePiece .model file")
    if vocab_path is not None and "://" not in vocab_path:
        vocab_path = os.path.abspath(vocab_path)
    hf_vocab = os.path.join(args.hf_dir, hf.SPM_FILE)
    # keep the checkpoint self-contained: an HF cache snapshot may be deleted later
    copy_vocab = vocab_path is None and os.path.isfile(hf_vocab)
    if copy_vocab:
        vocab_path = os.path.join(out, hf.SPM_FILE)
    try:
        config, params = hf.load(args.hf_dir)
        checkpoints.save_params(out, params, config, step=0, vocab_path=vocab_path, overwrite=args.overwrite)
    except (hf.HFFormatError, checkpoints.CheckpointError) as e:
        raise UserError(str(e)) from e
    if copy_vocab:
        shutil.copyfile(hf_vocab, vocab_path)
    print(f"imported {args.hf_dir} -> {out} ({config.num_encoder_layers}+{config.num_decoder_layers} layers, "
          f"d_model {config.emb_dim}, vocabulary {vocab_path or 'none recorded'})")
    return 0


def export_hf(args) -> int:
    from ul2lab import checkpoints, hf

    try:
        _, payload = checkpoints.read_config(args.checkpoint_dir)
        if hf.holds_hf_model(args.output_dir) and not args.overwrite:  # before reading params
            raise hf.HFFormatError(f"{args.output_dir} already holds a Hugging Face model; pass --overwrite "
                                   "to replace it, or choose another --output_dir")
        config, params = checkpoints.load_params(args.checkpoint_dir)
        vocab_path = args.vocab_path or payload.get("vocab_path")
        hf.save(config, params, args.output_dir, vocab_path=vocab_path, overwrite=args.overwrite)
    except (hf.HFFormatError, checkpoints.CheckpointError) as e:
        raise UserError(str(e)) from e
    print(f"exported {args.checkpoint_dir} -> {args.output_dir}"
          f"{' with tokenizer' if vocab_path else ' (no vocabulary recorded: no tokenizer files)'}")
    return 0
