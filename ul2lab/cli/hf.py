"""Flags of `ul2lab import-hf` and `ul2lab export-hf`: Hugging Face T5 directories <-> ul2lab checkpoints.

    ul2lab import-hf --hf_dir ~/flan-t5-base --output_dir ckpt/flan_t5_base
    ul2lab export-hf --checkpoint_dir ckpt/run1 --output_dir hf/run1

The work is ul2lab.interop.convert's.
"""


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
    p.set_defaults(func=run_import_hf)

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
    p.add_argument("--overwrite", action="store_true",
                   help="replace a model already in --output_dir (its weights, configs and tokenizer files; "
                        "other files there are kept)")
    p.add_argument("--allow_missing_checksums", action="store_true",
                   help="export a step that has no checksums (written before ul2lab saved them), its arrays unchecked")
    p.set_defaults(func=run_export_hf)


def run_import_hf(args) -> int:
    from ul2lab.interop import convert
    from ul2lab.train.config import check_output_dir
    check_output_dir(args.output_dir)  # tensorstore writes the arrays: a path it can use
    convert.import_hf(args.hf_dir, args.output_dir, args.vocab_path, args.overwrite)
    return 0


def run_export_hf(args) -> int:
    from ul2lab.interop import convert
    convert.export_hf(args.checkpoint_dir, args.output_dir, args.vocab_path, args.overwrite,
                      allow_missing_checksums=args.allow_missing_checksums)
    return 0
