"""Flags of `ul2lab import-t5x`, `ul2lab import-mtf` and `ul2lab export-t5x`: t5x and Mesh TensorFlow
checkpoints <-> ul2lab checkpoints.

    ul2lab import-t5x --checkpoint_dir ~/t5_1_1_base/checkpoint_1000000 --output_dir ckpt/t5_base --model t5_1_1_base
    ul2lab import-mtf --checkpoint_dir ~/t5.1.1.base --output_dir ckpt/t5_base_mtf
    ul2lab export-t5x --checkpoint_dir ckpt/run1 --output_dir t5x/run1

The work is ul2lab.interop.convert's.
"""


def add_parser(subparsers):
    p = subparsers.add_parser(
        "import-t5x", help="convert a t5x checkpoint into a ul2lab checkpoint",
        description="Convert a t5x checkpoint (msgpack with inline arrays, tensorstore/zarr, or t5x's orbax "
                    "layout; scanned or unrolled layers) into a ul2lab checkpoint at the same step, one array "
                    "at a time. Shapes are read from the arrays; the MLP activations and dropout from --model, "
                    "--gin_file, or the config.gin t5x saved beside the checkpoint_<step> folder, which also names "
                    "the vocabulary (seqio.SentencePieceVocabulary) the checkpoint records unless --vocab_path.")
    p.add_argument("--checkpoint_dir", required=True,
                   help="a t5x MODEL_DIR (its latest checkpoint_<step>) or one checkpoint_<step> folder")
    _add_output_flags(p)
    _add_model_flags(p, "the run's saved config.gin (t5x writes it into MODEL_DIR)")
    p.add_argument("--with_optimizer_state", action="store_true",
                   help="also import t5x's Adafactor moments (factored v_row/v_col, v), making --output_dir a "
                        "MODEL_DIR that `ul2lab train` resumes at the t5x step with ul2lab's default Adafactor")
    p.set_defaults(func=run_import_t5x)

    p = subparsers.add_parser(
        "import-mtf", help="convert a Mesh TensorFlow T5 checkpoint into a ul2lab checkpoint",
        description="Convert a Mesh TensorFlow T5 checkpoint (the original T5 and T5.1.1 releases: TensorFlow "
                    "checkpoint files with variables such as encoder/block_000/layer_000/SelfAttention/q) into a "
                    "ul2lab checkpoint at its global_step. Reading it needs TensorFlow.")
    p.add_argument("--checkpoint_dir", required=True,
                   help="the checkpoint folder (its latest model.ckpt-<step>) or a model.ckpt-<step> prefix")
    _add_output_flags(p)
    _add_model_flags(p, "the release's operative_config.gin beside the checkpoint; else T5's own activations "
                        "(wi: ReLU, wi_0/wi_1: gated GELU)")
    p.set_defaults(func=run_import_mtf)

    p = subparsers.add_parser(
        "export-t5x", help="write a ul2lab checkpoint as a t5x checkpoint",
        description="Write a step of a ul2lab checkpoint as a t5x MODEL_DIR: checkpoint_<step>/ in t5x's "
                    "tensorstore layout (params only, 2-D attention kernels, unrolled layers) and config.gin "
                    "with the model's network.T5Config and the vocabulary (copied beside it as sentencepiece.model, "
                    "bound as seqio.SentencePieceVocabulary; import-t5x reads it back). Restore it in t5x as a "
                    "params-only checkpoint.")
    p.add_argument("--checkpoint_dir", required=True,
                   help="a ul2lab checkpoint directory (MODEL_DIR of a run, or import-* output)")
    p.add_argument("--output_dir", required=True, help="t5x MODEL_DIR to create")
    p.add_argument("--step", type=int, default=None, help="the step to export (default: the latest)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a t5x export already in --output_dir (its checkpoint_<step> folders, config.gin "
                        "and vocabulary; other files there are kept)")
    p.add_argument("--allow_missing_checksums", action="store_true",
                   help="export a step that has no checksums (written before ul2lab saved them), its arrays unchecked")
    p.set_defaults(func=run_export_t5x)


def _add_output_flags(p):
    p.add_argument("--output_dir", required=True,
                   help="ul2lab checkpoint directory to create (written beside it first, moved in when done)")
    p.add_argument("--vocab_path", default=None,
                   help="SentencePiece model to record in the checkpoint (a local file or gs:// path), e.g. "
                        "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --output_dir")


def _add_model_flags(p, default: str):
    group = p.add_mutually_exclusive_group()
    group.add_argument("--model", default=None,
                       help=f"a ul2lab preset of the same shape (t5_1_1_base, ul2_20b, ...); default: {default}")
    group.add_argument("--gin_file", default=None,
                       help="a gin file with the model: a t5x run's config.gin, Mesh TF's operative_config.gin, "
                            "or a ul2lab model gin file")


def run_import_t5x(args) -> int:
    from ul2lab.interop import convert
    from ul2lab.train.config import check_output_dir
    check_output_dir(args.output_dir)  # tensorstore writes the arrays: a path it can use
    convert.import_t5x(args.checkpoint_dir, args.output_dir, args.model, args.gin_file, args.vocab_path,
                       args.overwrite, args.with_optimizer_state)
    return 0


def run_import_mtf(args) -> int:
    from ul2lab.interop import convert
    from ul2lab.train.config import check_output_dir
    check_output_dir(args.output_dir)  # tensorstore writes the arrays: a path it can use
    convert.import_mtf(args.checkpoint_dir, args.output_dir, args.model, args.gin_file, args.vocab_path,
                       args.overwrite)
    return 0


def run_export_t5x(args) -> int:
    from ul2lab.interop import convert
    from ul2lab.train.config import check_output_dir
    check_output_dir(args.output_dir)  # tensorstore writes the arrays: a path it can use
    convert.export_t5x(args.checkpoint_dir, args.output_dir, args.step, args.overwrite,
                       args.allow_missing_checksums)
    return 0
