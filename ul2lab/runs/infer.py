"""`ul2lab infer`'s work: a checkpoint's predictions (greedy, beam, sampling) or scores for a jsonl
file, or for a seqio task or mixture's split (as t5x's infer.py).

Input lines are JSON objects with "inputs" (and "targets" in score mode) as text, tokenized with
the checkpoint's vocabulary (config.json "vocab_path") plus EOS, as seqio's T5 tasks do. Each
output line is the input object plus "prediction" and "score" (predict: the log-likelihood of the
prediction) or "score" (score: the log-likelihood of "targets", EOS included).

A task's split is read in order through its preprocessors (features trimmed to
task_feature_lengths); each of its tasks gets INFER_OUTPUT_DIR/<task>-<mode>.jsonl-00000-of-00001
(t5x's name), one line per example: {"inputs": {its *_pretokenized fields}, "prediction", "score"}.

File rows use the checkpoint's spiece.model (checkpoints.vocabulary_path); in score mode, targets
longer than max_target_length are truncated, with a note.
"""
import json
import os
import sys
from typing import Iterator, List, Optional, Sequence

import jax
import numpy as np
import seqio

from ul2lab.data import pipeline
from ul2lab.errors import UserError
from ul2lab.files import atomic_write
from ul2lab.models import decoding
from ul2lab.models.special_ids import EOS_ID, PAD_ID
from ul2lab.runs import task_modules
from ul2lab.runs.settings import DecodeSettings, InferConfig
from ul2lab.train import checkpoints

# SentencePiece pieces are at most 16 characters long (its max_piece_length), so a text's first
# N tokens lie within its first 16 * N characters
MAX_CHARS_PER_TOKEN = 16


def load_checkpoint(checkpoint_dir: str, step=None, need_vocabulary: bool = True,
                    allow_missing_checksums: bool = False):
    """(config, params, seqio vocabulary or None) of a checkpoint directory (the params checked
    against their checksums), or a UserError saying what is missing or damaged. The vocabulary is
    looked up first, so a missing one fails before the params are read."""
    _, payload = checkpoints.read_config(checkpoint_dir)
    vocab = None
    vocab_path = checkpoints.vocabulary_path(checkpoint_dir, payload) if need_vocabulary else None
    if vocab_path is not None:
        vocab = seqio.SentencePieceVocabulary(vocab_path, extra_ids=payload.get("extra_ids", 100))
    elif need_vocabulary:
        raise UserError(f"{checkpoint_dir}/config.json has no vocab_path; set it to the SentencePiece .model "
                        "the model was trained with")
    config, params = load_params(checkpoint_dir, step, allow_missing_checksums)
    return config, params, vocab


def load_params(checkpoint_dir: str, step=None, allow_missing_checksums: bool = False):
    """(config, params) of a checkpoint step, checked to fit the model its config.json describes (an
    edited config.json, or a step folder copied from another model, is a one-line CheckpointError
    here, not a flax shape error in the middle of decoding)."""
    try:
        config, params, step = checkpoints.load_params(checkpoint_dir, step,
                                                       allow_missing_checksums=allow_missing_checksums)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    check_params_fit(config, params, checkpoint_dir, step)
    return config, params


def check_params_fit(config, params, checkpoint_dir: str, step: int):
    """CheckpointError naming the first parameters whose path or shape differs from the model's."""
    from ul2lab.models import network
    expected = jax.eval_shape(lambda rng: network.init_params(config, rng), jax.random.PRNGKey(0))
    wrong = checkpoints.shape_mismatches(params, expected)
    if wrong:
        raise checkpoints.CheckpointError(
            f"the parameters in {os.path.abspath(checkpoint_dir)} (step {step}) do not fit this model (the one its "
            f"{checkpoints.CONFIG_FILE} describes): {'; '.join(wrong[:3])}"
            + (f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else "")
            + f". Restore the {checkpoints.CONFIG_FILE} that wrote the step, or use a step of this model")


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


def _tokenize(vocab, texts: Sequence[str], max_length: int, what: str = "inputs",
              flag: str = "--max_input_length") -> List[List[int]]:
    """Token ids + EOS, truncated (with one note on stderr) to max_length. Texts are cut to
    MAX_CHARS_PER_TOKEN characters per allowed token first, so a 100k-character line costs no more
    than its first max_length tokens."""
    limit = MAX_CHARS_PER_TOKEN * (max_length + 1)
    ids = [list(vocab.encode(t[:limit])) + [EOS_ID] for t in texts]
    truncated = sum(len(x) > max_length for x in ids)
    if truncated:
        print(f"note: {truncated} of {len(ids)} {what} are longer than {max_length} tokens and were "
              f"truncated (raise {flag} to keep them whole)", file=sys.stderr)
    return [x[:max_length - 1] + [EOS_ID] if len(x) > max_length else x for x in ids]


def pad_rows(rows: Sequence[List[int]], length: int, batch_size: int) -> np.ndarray:
    """[batch_size, length] int32; missing rows (the last batch) are a lone EOS."""
    out = np.full((batch_size, length), PAD_ID, np.int32)
    out[:, 0] = EOS_ID
    for i, ids in enumerate(rows):
        out[i] = PAD_ID
        out[i, :len(ids)] = ids
    return out


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def strip_eos(tokens) -> List[int]:
    """Tokens up to (not including) the first EOS, without padding."""
    tokens = [int(t) for t in tokens]
    if EOS_ID in tokens:
        tokens = tokens[:tokens.index(EOS_ID)]
    return [t for t in tokens if t != PAD_ID]


def predict_tokens(config, params, inputs: np.ndarray, settings: DecodeSettings, rng) -> tuple:
    """Decode with an EvalConfig's / InferConfig's decoding settings."""
    return decoding.predict(params, config, inputs, settings.max_decode_length, beam_size=settings.beam_size,
                             alpha=settings.alpha, temperature=settings.temperature, top_k=settings.top_k,
                             top_p=settings.top_p, rng=rng, eos_id=EOS_ID)


def infer(settings: InferConfig) -> int:
    """Predict or score settings.input_file into settings.output_file, or each task of
    settings.mixture_or_task_name into settings.infer_output_dir; returns the number of examples."""
    if settings.mixture_or_task_name is not None:
        return infer_task(settings)
    if os.path.exists(settings.output_file) and not settings.overwrite:
        raise UserError(f"--output_file {settings.output_file} exists; pass --overwrite (InferConfig.overwrite "
                        "= True) or choose another file")
    score_mode = settings.mode == "score"
    rows = _read_jsonl(settings.input_file, need_targets=score_mode)
    config, params, vocab = load_checkpoint(settings.checkpoint_path, settings.step,
                                            allow_missing_checksums=settings.allow_missing_checksums)

    inputs = _tokenize(vocab, [r["inputs"] for r in rows], settings.max_input_length)
    targets = _tokenize(vocab, [r["targets"] for r in rows], settings.max_target_length, "targets",
                        "--max_target_length") if score_mode else None
    results = predict_or_score(config, params, vocab, inputs, targets, settings)
    atomic_write(settings.output_file, "".join(
        json.dumps({**row, **result}, ensure_ascii=False) + "\n" for row, result in zip(rows, results)))
    print(f"wrote {len(results)} {'scores' if score_mode else 'predictions'} to {settings.output_file}")
    return len(results)


def predict_or_score(config, params, vocab, inputs: List[List[int]], targets: Optional[List[List[int]]],
                     settings: InferConfig) -> List[dict]:
    """[{"prediction", "score"}] (targets None) or [{"score"}] for token-id rows, in order."""
    score_mode = targets is not None
    # one padded shape for all rows: one compilation
    input_length = max(len(ids) for ids in inputs)
    target_length = max(len(ids) for ids in targets) if score_mode else None
    batch_size = settings.batch_size
    rng = jax.random.PRNGKey(settings.seed)
    results = []
    for batch in batch_slices(len(inputs), batch_size):
        encoder_input = pad_rows(inputs[batch], input_length, batch_size)
        if score_mode:
            scores = decoding.score(params, config, encoder_input, pad_rows(targets[batch], target_length, batch_size))
            results += [{"score": float(s)} for s in np.asarray(scores)[:batch.stop - batch.start]]
            continue
        rng, key = jax.random.split(rng)
        tokens, scores = predict_tokens(config, params, encoder_input, settings, key)
        for tok, s in list(zip(np.asarray(tokens), np.asarray(scores)))[:batch.stop - batch.start]:
            results.append({"prediction": vocab.decode(strip_eos(tok)), "score": float(s)})
    return results


def infer_output_path(settings: InferConfig, task_name: str) -> str:
    """t5x's name for one task's inferences (one shard)."""
    return os.path.join(settings.infer_output_dir, f"{task_name}-{settings.mode}.jsonl-00000-of-00001")


def infer_task(settings: InferConfig) -> int:
    """Each task of a task or mixture that has settings.split -> infer_output_path(settings, task)."""
    task_modules.import_task_modules(settings.mixture_or_task_module)
    try:
        mixture_or_task = pipeline.get_mixture_or_task(settings.mixture_or_task_name)
    except ValueError as e:
        raise UserError(str(e)) from None
    subtasks = seqio.get_subtasks(mixture_or_task)
    tasks = [t for t in subtasks if settings.split in t.splits]
    if not tasks:
        splits = sorted({s for t in subtasks for s in t.splits})
        raise UserError(f"--split {settings.split!r}: {settings.mixture_or_task_name!r} has no task with that "
                        f"split; its splits: {', '.join(splits)}")
    for task in tasks:
        path = infer_output_path(settings, task.name)
        if os.path.exists(path) and not settings.overwrite:
            raise UserError(f"{path} exists; pass --overwrite (InferConfig.overwrite = True) or choose another "
                            "--infer_output_dir")
    lengths = dict(settings.task_feature_lengths or {"inputs": settings.max_input_length,
                                                     "targets": settings.max_decode_length})
    # the task brings its vocabulary: the checkpoint's vocab_path is not needed
    config, params = load_params(settings.checkpoint_path, settings.step, settings.allow_missing_checksums)
    total = 0
    for task in tasks:
        examples = task_examples(task, lengths, settings)
        if not examples:
            print(f"note: the {settings.split!r} split of {task.name} has no example; nothing written for it")
            continue
        vocab = task.output_features["targets"].vocabulary
        inputs = [[int(t) for t in ex["inputs"]] or [EOS_ID] for ex in examples]
        targets = [[int(t) for t in ex["targets"]] or [EOS_ID] for ex in examples] if settings.mode == "score" else None
        results = predict_or_score(config, params, vocab, inputs, targets, settings)
        path = infer_output_path(settings, task.name)
        atomic_write(path, "".join(json.dumps({"inputs": _pretokenized(ex, vocab), **result}, ensure_ascii=False)
                                   + "\n" for ex, result in zip(examples, results)))
        print(f"wrote {len(results)} {'scores' if targets is not None else 'predictions'} of {task.name} to {path}")
        total += len(results)
    return total


def task_examples(task, lengths: dict, settings: InferConfig) -> list:
    """The examples of a task's split at `lengths`; lengths its preprocessors cannot use (an objective
    whose targets length is too short) are a one-line UserError, as `ul2lab eval` says it."""
    try:
        return list(task.get_dataset(lengths, split=settings.split, shuffle=False, num_epochs=1).as_numpy_iterator())
    except ValueError as e:
        reason = str(e).split("\n  In call to configurable")[0]  # gin's note of where it was raised
        raise UserError(f"--mixture_or_task {task.name!r} cannot be read at --feature_lengths "
                        f"inputs={lengths['inputs']},targets={lengths['targets']}: {' '.join(reason.split())}") from None


def _pretokenized(example: dict, vocab) -> dict:
    """An example's *_pretokenized text fields (t5x's "inputs" of an inference line), else its decoded inputs."""
    fields = {k: v.decode("utf-8", "replace") if isinstance(v, bytes) else v.tolist() if hasattr(v, "tolist") else v
              for k, v in example.items() if k.endswith("_pretokenized")}
    return fields or {"inputs": vocab.decode(strip_eos(example["inputs"]))}
