"""`ul2lab infer` (predict or score a jsonl file) and `ul2lab eval` (a seqio eval of a checkpoint).

    ul2lab infer --checkpoint_dir D --input_file in.jsonl --output_file out.jsonl \
        [--mode predict|score] [--beam_size N --alpha A] [--temperature T --top_k K --top_p P]
    ul2lab eval --checkpoint_dir D --mixture_or_task NAME [--split validation] \
        [--feature_lengths inputs=512,targets=114] [--eval_output_dir DIR]

or, as t5x's eval.py / infer.py, from gin run files (gin/runs/eval.gin, gin/runs/infer.gin):

    ul2lab eval --gin_file=runs/eval.gin --gin.CHECKPOINT_PATH=D --gin.MIXTURE_OR_TASK_NAME=NAME \
        --gin.EVAL_OUTPUT_DIR=DIR
    ul2lab infer --gin_file=runs/infer.gin --gin.CHECKPOINT_PATH=D --gin.INPUT_FILE=in.jsonl \
        --gin.OUTPUT_FILE=out.jsonl --gin.BEAM_SIZE=4

The gin files bind EvalConfig / InferConfig (registered in ul2lab/gin_registry.py); every flag sets
the field of the same meaning. When both are given, explicit flags win over gin (files and
--gin.NAME=VALUE bindings alike): `--gin_file=runs/eval.gin --batch_size 4` evaluates with batch 4.

Input lines are JSON objects with "inputs" (and "targets" in score mode) as text, tokenized with
the checkpoint's vocabulary (config.json "vocab_path") plus EOS, as seqio's T5 tasks do. Each
output line is the input object plus "prediction" and "score" (predict: the log-likelihood of the
prediction) or "score" (score: the log-likelihood of "targets", EOS included).
"""
import dataclasses
import json
import os
import sys
from typing import Iterator, List, Mapping, Optional, Sequence

import numpy as np

from ul2lab import gin_cli
from ul2lab.cli import UserError

EOS_ID = 1
EVAL_METRICS_FILE = "metrics.json"  # what `ul2lab eval` writes into EVAL_OUTPUT_DIR


@dataclasses.dataclass(frozen=True)
class InferConfig:
    """`ul2lab infer` settings (gin: `InferConfig.<field> = ...`, see gin/runs/infer.gin)."""
    checkpoint_path: str            # a ul2lab checkpoint directory (has config.json)
    input_file: str                 # jsonl, one {"inputs": ..., "targets": ...} per line
    output_file: str                # jsonl written here, one line per input line
    mode: str = "predict"           # "predict" | "score" (log-likelihood of each line's whole targets)
    step: Optional[int] = None      # checkpoint step (None: the latest)
    batch_size: int = 16
    max_input_length: int = 512     # inputs are truncated to this (EOS included)
    max_decode_length: int = 128
    beam_size: int = 1              # > 1: beam search
    alpha: float = 0.6              # beam search length penalty ((5+len)/6)^alpha
    temperature: float = 0.0        # > 0: sampling (0: greedy or beam)
    top_k: int = 0                  # sample from the top K tokens only (0: all)
    top_p: float = 1.0              # sample from the smallest set with probability >= P
    seed: int = 0                   # sampling seed
    overwrite: bool = False         # replace output_file if it exists


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`ul2lab eval` settings (gin: `EvalConfig.<field> = ...`, see gin/runs/eval.gin)."""
    checkpoint_path: str
    mixture_or_task_name: str       # a registered seqio task or mixture
    task_feature_lengths: Mapping[str, int] = dataclasses.field(  # examples are truncated to these
        default_factory=lambda: {"inputs": 512, "targets": 114})
    split: str = "validation"
    eval_output_dir: Optional[str] = None   # metrics.json is written here
    output_file: Optional[str] = None       # also write the metrics JSON to this exact file
    max_examples: Optional[int] = None      # evaluate only the first N examples
    step: Optional[int] = None
    batch_size: int = 16
    max_decode_length: int = 128
    beam_size: int = 1
    alpha: float = 0.6
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


# fields whose flag has another name (every other field's flag is --<field>)
FLAGS = {"checkpoint_path": "--checkpoint_dir", "mixture_or_task_name": "--mixture_or_task",
         "task_feature_lengths": "--feature_lengths"}


FLAGS_WIN = "Flags given explicitly override the gin files and --gin. bindings."


def _flag(field: str) -> str:
    return FLAGS.get(field, f"--{field}")


def add_parser(subparsers):
    # flags default to None ("not given"): the defaults are EvalConfig's / InferConfig's, and a flag
    # that is given overrides the gin files
    p = subparsers.add_parser("infer", help="predict (greedy, beam, sampling) or score a jsonl file",
                              description="predict (greedy, beam, sampling) or score a jsonl file; "
                                          "configure by flags or gin (gin/runs/infer.gin); flags win")
    gin_cli.add_gin_arguments(p, "--gin.CHECKPOINT_PATH=/ckpt --gin.INPUT_FILE=in.jsonl --gin.OUTPUT_FILE=out.jsonl")
    p.epilog += " Start from --gin_file=runs/infer.gin. " + FLAGS_WIN
    _add_checkpoint_args(p)
    p.add_argument("--input_file", help='jsonl, one {"inputs": ..., "targets": ...} per line')
    p.add_argument("--output_file", help="jsonl written here, one line per input line")
    p.add_argument("--mode", choices=("predict", "score"),
                   help="predict (default) or score: log-likelihood of each line's whole targets (never truncated)")
    p.add_argument("--max_input_length", type=int, help="inputs are truncated to this (EOS included; default 512)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace --output_file if it exists")
    p.set_defaults(func=run_infer)

    e = subparsers.add_parser("eval", help="run a seqio task or mixture's metrics on a checkpoint",
                              description="run a seqio task or mixture's metrics on a checkpoint; configure by "
                                          "flags or gin (gin/runs/eval.gin); flags win")
    gin_cli.add_gin_arguments(e, "--gin.CHECKPOINT_PATH=/ckpt --gin.MIXTURE_OR_TASK_NAME=my_task "
                                 "--gin.EVAL_OUTPUT_DIR=/tmp/eval")
    e.epilog += " Start from --gin_file=runs/eval.gin. " + FLAGS_WIN
    _add_checkpoint_args(e)
    e.add_argument("--mixture_or_task", dest="mixture_or_task_name", metavar="NAME",
                   help="a registered seqio task or mixture name")
    e.add_argument("--split", help="default validation")
    e.add_argument("--feature_lengths", dest="task_feature_lengths", metavar="inputs=N,targets=M",
                   help="examples are truncated to these lengths (default inputs=512,targets=114)")
    e.add_argument("--max_examples", type=int, help="evaluate only the first N examples")
    e.add_argument("--eval_output_dir", help=f"write the metrics to DIR/{EVAL_METRICS_FILE}")
    e.add_argument("--output_file", help="also write the metrics here as JSON")
    e.set_defaults(func=run_eval)


def _add_checkpoint_args(p):
    p.add_argument("--checkpoint_dir", dest="checkpoint_path", metavar="DIR",
                   help="a ul2lab checkpoint directory (has config.json)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--batch_size", type=int, help="default 16")
    p.add_argument("--max_decode_length", type=int, help="default 128")
    p.add_argument("--beam_size", type=int, help="> 1: beam search (default 1)")
    p.add_argument("--alpha", type=float, help="beam search length penalty ((5+len)/6)^alpha (default 0.6)")
    p.add_argument("--temperature", type=float, help="> 0: sampling (default 0: greedy or beam)")
    p.add_argument("--top_k", type=int, help="sample from the top K tokens only (default 0: all)")
    p.add_argument("--top_p", type=float, help="sample from the smallest set with probability >= P (default 1)")
    p.add_argument("--seed", type=int, help="sampling seed (default 0)")


def settings_from_args(cls, args, run_file: str):
    """EvalConfig / InferConfig from gin (when --gin_file or --gin. is given) with the given flags on top."""
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    if isinstance(flags.get("task_feature_lengths"), str):
        flags["task_feature_lengths"] = parse_feature_lengths(flags["task_feature_lengths"])
    if args.gin_file or args.gin_bindings:
        settings = gin_cli.load_config(
            cls.__name__, args.gin_file, args.gin_bindings, args.gin_search_paths, start_from=run_file,
            missing_hint=f"include {run_file}, or pass " + ", ".join(_flag(f) for f in _required_fields(cls)),
            overrides=flags, flags={f.name: _flag(f.name) for f in dataclasses.fields(cls)})
    else:
        missing = [f for f in _required_fields(cls) if f not in flags]
        if missing:
            raise UserError(f"{', '.join(_flag(m) for m in missing)} required: pass "
                            f"{' '.join(_flag(m) + ' ...' for m in missing)}, or use a gin run file: "
                            f"--gin_file={run_file} " + " ".join(f"--gin.{m.upper()}=..." for m in missing))
        settings = cls(**flags)
    _check_settings(settings)
    return settings


def _required_fields(cls) -> List[str]:
    return [f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def _check_settings(settings):
    """Values from flags or gin that cannot work, named with both spellings (flag and gin field)."""
    cls = type(settings).__name__

    def name(field):
        return f"{_flag(field)} ({cls}.{field})"

    for field, ok, fix in [
            ("batch_size", lambda v: v >= 1, "a positive number"),
            ("max_decode_length", lambda v: v >= 1, "a positive number"),
            ("max_input_length", lambda v: v >= 2, "at least 2"),
            ("beam_size", lambda v: v >= 1, "1 (greedy) or more"),
            ("alpha", lambda v: v >= 0, "0 (no length penalty) or a positive number"),
            ("temperature", lambda v: v >= 0, "0 (greedy) or a positive number"),
            ("top_k", lambda v: v >= 0, "0 (all tokens) or a positive number"),
            ("top_p", lambda v: 0 < v <= 1, "a number in (0, 1]")]:
        if not hasattr(settings, field):
            continue
        value = getattr(settings, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{name(field)} is {value!r} ({type(value).__name__}); use a number: {fix}")
        if not ok(value):
            raise UserError(f"{name(field)} {value!r} is invalid; use {fix}")
    if settings.beam_size > 1 and settings.temperature > 0:
        raise UserError("--beam_size > 1 and --temperature > 0 both given; choose beam search or sampling")
    if (settings.top_k or settings.top_p < 1) and settings.temperature == 0:
        raise UserError("--top_k/--top_p only apply to sampling; also pass --temperature (e.g. 1.0)")
    if getattr(settings, "mode", "predict") not in ("predict", "score"):
        raise UserError(f"{name('mode')} {settings.mode!r} is invalid; use predict or score")
    lengths = getattr(settings, "task_feature_lengths", {"inputs": 1, "targets": 1})
    if (not isinstance(lengths, Mapping) or set(lengths) != {"inputs", "targets"}
            or not all(isinstance(v, int) and v >= 1 for v in lengths.values())):
        raise UserError(f"{name('task_feature_lengths')} {lengths!r} is invalid; use "
                        "{'inputs': 512, 'targets': 114} (gin) or inputs=512,targets=114 (flag)")


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


def predict_tokens(config, params, inputs: np.ndarray, settings, rng) -> tuple:
    """Decode with an EvalConfig's / InferConfig's decoding settings."""
    from ul2lab import inference
    return inference.predict(params, config, inputs, settings.max_decode_length, beam_size=settings.beam_size,
                             alpha=settings.alpha, temperature=settings.temperature, top_k=settings.top_k,
                             top_p=settings.top_p, rng=rng, eos_id=EOS_ID)


def run_infer(args) -> int:
    return infer(settings_from_args(InferConfig, args, "gin/runs/infer.gin"))


def infer(settings: InferConfig) -> int:
    if os.path.exists(settings.output_file) and not settings.overwrite:
        raise UserError(f"--output_file {settings.output_file} exists; pass --overwrite (InferConfig.overwrite "
                        "= True) or choose another file")
    score_mode = settings.mode == "score"
    rows = _read_jsonl(settings.input_file, need_targets=score_mode)
    config, params, vocab = load_checkpoint(settings.checkpoint_path, settings.step)

    import jax
    from ul2lab import inference
    inputs = _tokenize(vocab, [r["inputs"] for r in rows], settings.max_input_length)
    targets = _tokenize(vocab, [r["targets"] for r in rows]) if score_mode else None  # scored whole
    # one padded shape for the whole file: one compilation
    input_length = max(len(ids) for ids in inputs)
    target_length = max(len(ids) for ids in targets) if score_mode else None
    batch_size = settings.batch_size
    rng = jax.random.PRNGKey(settings.seed)
    results = []
    for batch in _batches(len(rows), batch_size):
        encoder_input = _pad(inputs[batch], input_length, batch_size)
        if score_mode:
            scores = inference.score(params, config, encoder_input, _pad(targets[batch], target_length, batch_size))
            results += [{"score": float(s)} for s in np.asarray(scores)[:batch.stop - batch.start]]
            continue
        rng, key = jax.random.split(rng)
        tokens, scores = predict_tokens(config, params, encoder_input, settings, key)
        for tok, s in list(zip(np.asarray(tokens), np.asarray(scores)))[:batch.stop - batch.start]:
            results.append({"prediction": vocab.decode(_strip(tok)), "score": float(s)})

    _write_atomically(settings.output_file, "".join(
        json.dumps({**row, **result}, ensure_ascii=False) + "\n" for row, result in zip(rows, results)))
    print(f"wrote {len(results)} {'scores' if score_mode else 'predictions'} to {settings.output_file}")
    return 0


def _write_atomically(path: str, text: str):
    """A reader never sees half a file, and an interrupted write leaves the old file whole."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


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
    settings = settings_from_args(EvalConfig, args, "gin/runs/eval.gin")
    config, params, _ = load_checkpoint(settings.checkpoint_path, settings.step)
    metrics = evaluate(config, params, settings)
    for task, values in sorted(metrics.items()):
        for name, value in sorted(values.items()):
            print(f"{task}/{name}: {value}")
    text = json.dumps(metrics, indent=2, sort_keys=True, default=float) + "\n"
    paths = [settings.output_file] if settings.output_file else []
    if settings.eval_output_dir:
        paths.append(os.path.join(settings.eval_output_dir, EVAL_METRICS_FILE))
    for path in paths:
        _write_atomically(path, text)
        print(f"wrote the metrics to {path}")
    return 0


def evaluate(config, params, settings: EvalConfig) -> dict:
    """{task name: {metric: value}} from seqio.Evaluator with this model's predict and score fns."""
    import jax
    import seqio
    from ul2lab import inference
    mixture_or_task, split, lengths = settings.mixture_or_task_name, settings.split, settings.task_feature_lengths
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
        num_examples=settings.max_examples, use_memory_cache=True, async_compute_metrics=False)
    if not evaluator.eval_tasks:
        raise UserError(f"{mixture_or_task!r} has no task with a {split!r} split and metric functions")
    rng = [jax.random.PRNGKey(settings.seed)]

    def batched(dataset):
        """(indices, features) numpy batches of a cached (index, features) eval dataset."""
        examples = list(dataset.as_numpy_iterator())
        for batch in _batches(len(examples), settings.batch_size):
            chunk = examples[batch]
            yield [i for i, _ in chunk], {k: _pad_array([ex[k] for _, ex in chunk], settings.batch_size)
                                         for k in ("encoder_input_tokens", "decoder_target_tokens")}

    def predict_fn(dataset):
        out = []
        for indices, features in batched(dataset):
            rng[0], key = jax.random.split(rng[0])
            tokens, _ = predict_tokens(config, params, features["encoder_input_tokens"], settings, key)
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
