"""Flags of `ul2lab vocab`: train a SentencePiece vocabulary with T5's conventions (ul2lab.data.vocab)."""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "vocab", help="train a SentencePiece vocabulary (T5 conventions) from text files",
        description="Train a SentencePiece model with T5's conventions (pad 0, eos 1, unk 2, "
                    "no bos, byte fallback). Load it with "
                    "seqio.SentencePieceVocabulary(P.model, extra_ids=100), or, with --extra_ids N "
                    "(the model then carries its sentinels, as T5's cc_all.32000.100extra does), "
                    "with extra_ids=0.")
    parser.add_argument("--input", nargs="+", required=True, metavar="FILES",
                        help=".txt or .jsonl files or globs (jsonl: one {\"text\": ...} per line)")
    parser.add_argument("--vocab_size", type=int, required=True, metavar="N",
                        help="pieces in the model, not counting the extra ids seqio adds")
    parser.add_argument("--output_prefix", required=True, metavar="P",
                        help="writes P.model and P.vocab")
    parser.add_argument("--jsonl_field", default="text",
                        help="field of each .jsonl line that holds the text (default: text)")
    parser.add_argument("--model_type", default="unigram", choices=("unigram", "bpe"))
    parser.add_argument("--max_sentences", type=int, default=0,
                        help="train on a random sample of this many lines (0: all lines)")
    parser.add_argument("--extra_ids", type=int, default=0, metavar="N",
                        help="sentinel pieces <extra_id_N-1> ... <extra_id_0> appended at the top ids "
                             "of the model (default 0: seqio adds them when loading). UL2's X(3, 0.5) "
                             "needs 126 at inputs 512 and 254 at 1024; with fewer, the objective "
                             "plans shorter examples")
    parser.add_argument("--force", action="store_true", help="overwrite an existing P.model")
    parser.set_defaults(func=run_vocab)


def run_vocab(args) -> int:
    from ul2lab.data import vocab
    print(vocab.train_from_files(args.input, args.vocab_size, args.output_prefix, jsonl_field=args.jsonl_field,
                                 model_type=args.model_type, max_sentences=args.max_sentences, force=args.force,
                                 extra_ids=args.extra_ids))
    return 0
