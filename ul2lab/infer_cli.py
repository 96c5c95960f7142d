"""`ul2lab infer` (predict or score a jsonl file) and `ul2lab eval` (a seqio eval of a checkpoint).

    ul2lab infer --checkpoint_dir D --input_file in.jsonl --output_file out.jsonl \
        [--mode predict|score] [--beam_size N --alpha A] [--temperature T --top_k K --top_p P]
    ul2lab eval --checkpoint_dir D --mixture_or_task NAME [--split validation] \
        [--feature_lengths inputs=512,targets=114]

Input lines are JSON objects with "inputs" (and "targets" in score mode) as text, tokenized with
the checkpoint's vocabulary (config.json "vocab_path") plus EOS, as seqio's T5 tasks do. Each
output line is the input object plus "prediction" and "score" (predict: the log-likelihood of the
prediction) or "score" (score: the log-likelihood of "targets", EOS included).
"""
import json
import os
import sys
from typing import Iterator, List, Optional, Sequence

import numpy as np

from ul2lab.cli import UserError

EOS_ID = 1


def add_parser(subparsers):
    p = subparsers.add_parser("infer", help="predict (greedy, beam, sampling) or score a jsonl file")
    _add_checkpoint_args(p)
    p.add_argument("--input_file", required=True, help='jsonl, one {"inputs": ..., "targets": ...} per line')
    p.add_argument("--output_file", required=True, help="jsonl written here, one line per input line")
    p.add_argument("--mode", choices=("predict", "score"), default="predict",
                   help="score: log-likelihood of each line's whole targets (never truncated)")
    p.add_argument("--max_input_length", type=int, default=512, help="inputs are truncated to this (EOS included)")
    p.add_argument("--overwrite", action="store_true", help="replace --output_file if it exists")
    p.set_defaults(func=run_infer)

    e = subparsers.add_parser("eval", help="run a seqio task or mixture's metrics on a checkpoint")
    _add_checkpoint_args(e)
    e.add_argument("--mixture_or_task", required=True, help="a registered seqio task or mixture name")
    e.add_argument("--split", default="validation")
    e.add_argument("--feature_lengths", default="inputs=512,targets=114",
                   help="inputs=N,targets=M: examples are truncated to these lengths")
    e.add_argument("--max_examples", type=int, default=None, help="evaluate only the first N examples")
    e.add_argument("--output_file", default=None, help="also write the metrics here as JSON")
    e.set_defaults(func=run_eval)


def _add_checkpoint_args(p):
    p.add_argument("--checkpoint_dir", required=True, help="a ul2lab checkpoint directory (has config.json)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_decode_length", type=int, default=128)
    p.add_argument("--beam_size", type=int, default=1, help="> 1: beam search")
    p.add_argument("--alpha", type=float, default=0.6, help="beam search length penalty ((5+len)/6)^alpha")
    p.add_argument("--temperature", type=float, default=0.0, help="> 0: sampling (0: greedy or beam)")
    p.add_argument("--top_k", type=int, default=0, help="sample from the top K tokens only (0: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="sample from the smallest set with probability >= P")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


def _check_decoding_args(args):
    for name, ok, fix in [
            ("batch_size", args.batch_size >= 1, "a positive number"),
            ("max_decode_length", args.max_decode_length >= 1, "a positive number"),
            ("beam_size", args.beam_size >= 1, "1 (greedy) or more"),
            ("alpha", args.alpha >= 0, "0 (no length penalty) or a positive number"),
            ("temperature", args.temperature >= 0, "0 (greedy) or a positive number"),
            ("top_k", args.top_k >= 0, "0 (all tokens) or a positive number"),
            ("top_p", 0 < args.top_p <= 1, "a number in (0, 1]")]:
        if not ok:
            raise UserError(f"--{name} {getattr(args, name)} is invalid; use {fix}")
    if args.beam_size > 1 and args.temperature > 0:
        raise UserError("--beam_size > 1 and --temperature > 0 both given; choose beam search or sampling")
    if (args.top_k or args.top_p < 1) and args.temperature == 0:
        raise UserError("--top_k/--top_p only apply to sampling; also pass --temperature (e.g. 1.0)")


def load_checkpoint(checkpoint_dir: str, step=None):
    """(config, params, seqio vocabulary) of a checkpoint directory, or a UserError saying what is missing."""
    from ul2lab import checkpoints
    try:
        config, payload = checkpoints.read_config(checkpoint_dir)
        config, params = checkpoints.load_params(checkpoint_dir, step)
    except (checkpoints.CheckpointError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    vocab_path = payload.get("vocab_path")
    if not vocab_path:
        raise UserError(f"{checkpoint_dir}/config.json has no vocab_path; set it to the SentencePiece .model "
                        "the model was trained with")
    if "://" not in vocab_path and not os.path.isfile(vocab_path):
        raise UserError(f"vocabulary {vocab_path} (vocab_path in {checkpoint_dir}/config.json) does not exist")
    import seqio
    vocab = seqio.SentencePieceVocabulary(vocab_path, extra_ids=payload.get("extra_ids", 100))
    return config, params, vocab


# ---------------------------------------------------------------------------- infer

def _read_jsonl(path: str, need_targets: bool) -> List[dict]:
    if not os.path.isfile(path):
        raise UserError(f"--input_file {path} does not exist")
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {number} is not JSON ({e.msg}); write one JSON object per line")
            fields = ("inputs", "targets") if need_targets else ("inputs",)
            for field in fields:
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    raise UserError(f'{path} line {number} has no text "{field}" field'
                                    + ("; score mode needs both inputs and targets" if need_targets else ""))
            rows.append(row)
    if not rows:
        raise UserError(f"--input_file {path} has no examples")
    return rows


def _tokenize(vocab, texts: Sequence[str], max_length: Optional[int] = None) -> List[List[int]]:
    """Token ids + EOS, truncated (with a note on stderr) to max_length when given."""
    ids = [list(vocab.encode(t)) + [EOS_ID] for t in texts]
    if max_length is None:
        return ids
    truncated = sum(len(x) > max_length for x in ids)
    if truncated:
        print(f"note: {truncated} of {len(ids)} inputs are longer than {max_length} tokens and were "
              "truncated (raise --max_input_length to keep them whole)", file=sys.stderr)
    return [x[:max_length - 1] + [EOS_ID] if len(x) > max_length else x for x in ids]


def _pad(rows: Sequence[List[int]], length: int, batch_size: int) -> np.ndarray:
    """[batch_size, length] int32; missing rows (the last batch) are a lone EOS."""
    out = np.zeros((batch_size, length), np.int32)
    out[:, 0] = EOS_ID
    for i, ids in enumerate(rows):
        out[i] = 0
        out[i, :len(ids)] = ids
    return out


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _strip(tokens) -> List[int]:
    """Tokens up to (not including) the first EOS, without padding."""
    tokens = [int(t) for t in tokens]
    if EOS_ID in tokens:
        tokens = tokens[:tokens.index(EOS_ID)]
    return [t for t in tokens if t != 0]


def predict_tokens(config, params, inputs: np.ndarray, args, rng) -> tuple:
    from ul2lab import inference
    return inference.predict(params, config, inputs, args.max_decode_length, beam_size=args.beam_size,
                             alpha=args.alpha, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, rng=rng, eos_id=EOS_ID)


def run_infer(args) -> int:
    _check_decoding_args(args)
    if args.max_input_length < 2:
        raise UserError(f"--max_input_length {args.max_input_length} is too short; use at least 2")
    if os.path.exists(args.output_file) and not args.overwrite:
        raise UserError(f"--output_file {args.output_file} exists; pass --overwrite or choose another file")
    score_mode = args.mode == "score"
    rows = _read_jsonl(args.input_file, need_targets=score_mode)
    config, params, vocab = load_checkpoint(args.checkpoint_dir, args.step)

    import jax
    from ul2lab import inference
    inputs = _tokenize(vocab, [r["inputs"] for r in rows], args.max_input_length)
    targets = _tokenize(vocab, [r["targets"] for r in rows]) if score_mode else None  # scored whole
    # one padded shape for the whole file: one compilation
    input_length = max(len(ids) for ids in inputs)
    target_length = max(len(ids) for ids in targets) if score_mode else None
    rng = jax.random.PRNGKey(args.seed)
    results = []
    for batch in _batches(len(rows), args.batch_size):
        encoder_input = _pad(inputs[batch], input_length, args.batch_size)
        if score_mode:
            scores = inference.score(params, config, encoder_input,
                                     _pad(targets[batch], target_length, args.batch_size))
            results += [{"score": float(s)} for s in np.asarray(scores)[:batch.stop - batch.start]]
            continue
        rng, key = jax.random.split(rng)
        tokens, scores = predict_tokens(config, params, encoder_input, args, key)
        for tok, s in list(zip(np.asarray(tokens), np.asarray(scores)))[:batch.stop - batch.start]:
            results.append({"prediction": vocab.decode(_strip(tok)), "score": float(s)})

    tmp = args.output_file + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(args.output_file)), exist_ok=True)
    with open(tmp, "w") as f:
        for row, result in zip(rows, results):
            f.write(json.dumps({**row, **result}, ensure_ascii=False) + "\n")
    os.replace(tmp, args.output_file)
    print(f"wrote {len(results)} {'scores' if score_mode else 'predictions'} to {args.output_file}")
    return 0


# ---------------------------------------------------------------------------- eval

def parse_feature_lengths(text: str) -> dict:
    """"inputs=512,targets=114" -> {"inputs": 512, "targets": 114}."""
    lengths = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in ("inputs", "targets") or not value.strip().isdigit() or int(value) < 1:
            raise UserError(f"--feature_lengths {text!r} is not like inputs=512,targets=114")
        lengths[name.strip()] = int(value)
    if set(lengths) != {"inputs", "targets"}:
        raise UserError(f"--feature_lengths {text!r} needs both inputs=N and targets=M")
    return lengths


def run_eval(args) -> int:
    _check_decoding_args(args)
    lengths = parse_feature_lengths(args.feature_lengths)
    config, params, _ = load_checkpoint(args.checkpoint_dir, args.step)
    metrics = evaluate(config, params, args.mixture_or_task, args.split, lengths, args,
                       max_examples=args.max_examples)
    for task, values in sorted(metrics.items()):
        for name, value in sorted(values.items()):
            print(f"{task}/{name}: {value}")
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True, default=float)
    return 0


def evaluate(config, params, mixture_or_task: str, split: str, lengths: dict, args,
             max_examples=None) -> dict:
    """{task name: {metric: value}} from seqio.Evaluator with this model's predict and score fns."""
    import jax
    import seqio
    from ul2lab import inference
    try:
        import ul2lab_tasks  # noqa: F401  registers the project's tasks and mixtures
    except ImportError:
        pass
    try:
        seqio.get_mixture_or_task(mixture_or_task)
    except ValueError:
        known = sorted(seqio.MixtureRegistry.names()) + sorted(seqio.TaskRegistry.names())
        raise UserError(f"no seqio task or mixture named {mixture_or_task!r}; registered: {known}") from None
    evaluator = seqio.Evaluator(
        mixture_or_task, feature_converter=seqio.EncDecFeatureConverter(pack=False), eval_split=split,
        sequence_length={"inputs": lengths["inputs"], "targets": lengths["targets"]},
        num_examples=max_examples, use_memory_cache=True, async_compute_metrics=False)
    if not evaluator.eval_tasks:
        raise UserError(f"{mixture_or_task!r} has no task with a {split!r} split and metric functions")
    rng = [jax.random.PRNGKey(args.seed)]

    def batched(dataset):
        """(indices, features) numpy batches of a cached (index, features) eval dataset."""
        examples = list(dataset.as_numpy_iterator())
        for batch in _batches(len(examples), args.batch_size):
            chunk = examples[batch]
            yield [i for i, _ in chunk], {k: _pad_array([ex[k] for _, ex in chunk], args.batch_size)
                                         for k in ("encoder_input_tokens", "decoder_target_tokens")}

    def predict_fn(dataset):
        out = []
        for indices, features in batched(dataset):
            rng[0], key = jax.random.split(rng[0])
            tokens, _ = predict_tokens(config, params, features["encoder_input_tokens"], args, key)
            out += [(i, _strip(t)) for i, t in zip(indices, np.asarray(tokens))]
        return out

    def score_fn(dataset):
        out = []
        for indices, features in batched(dataset):
            scores = inference.score(params, config, features["encoder_input_tokens"],
                                     features["decoder_target_tokens"])
            out += [(i, float(s)) for i, s in zip(indices, np.asarray(scores))]
        return out

    all_metrics, _ = evaluator.evaluate(compute_metrics=True, predict_fn=predict_fn, score_fn=score_fn)
    return {task: {k: _plain(v) for k, v in values.items()} for task, values in all_metrics.result().items()}


def _pad_array(rows, batch_size: int) -> np.ndarray:
    length = max(len(r) for r in rows)
    return _pad([list(r[:length]) for r in rows], length, batch_size)


def _plain(value):
    """seqio metric values (floats, numpy, seqio.metrics.Scalar) as JSON-friendly numbers."""
    value = getattr(value, "value", value)
    return value.item() if hasattr(value, "item") else value
