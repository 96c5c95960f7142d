"""Settings of `ul2lab eval` and `ul2lab infer` (gin: `EvalConfig.<field>`, `InferConfig.<field>`,
see gin/runs/eval.gin and gin/runs/infer.gin), and their one validation.

Both read a checkpoint and decode with it, so they share DecodeSettings; the decode settings are
checked once, here, with both spellings of each setting in the message (flag and gin field).
"""
import dataclasses
from typing import Any, List, Mapping, Optional

from ul2lab.errors import UserError
from ul2lab.models import decoding

EVAL_METRICS_FILE = "metrics.json"  # what `ul2lab eval` writes into EVAL_OUTPUT_DIR


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeSettings:
    """Which checkpoint, and how to decode with it: greedy (temperature 0), beam search, sampling."""
    checkpoint_path: str            # a ul2lab checkpoint directory (has config.json)
    step: Optional[int] = None      # checkpoint step (None: the latest)
    batch_size: int = 16
    max_decode_length: int = 128
    beam_size: int = 1              # > 1: beam search
    alpha: float = 0.6              # beam search length penalty ((5+len)/6)^alpha
    temperature: float = 0.0        # > 0: sampling (0: greedy or beam)
    top_k: int = 0                  # sample from the top K tokens only (0: all)
    top_p: float = 1.0              # sample from the smallest set with probability >= P
    seed: int = 0                   # sampling seed
    allow_missing_checksums: bool = False  # read a step that has no checksums (its arrays unchecked)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InferConfig(DecodeSettings):
    """`ul2lab infer` settings (gin: `InferConfig.<field> = ...`, see gin/runs/infer.gin): a jsonl file
    (input_file -> output_file) or, as t5x's infer.py, a seqio task or mixture's split -> infer_output_dir."""
    input_file: Optional[str] = None    # jsonl, one {"inputs": ..., "targets": ...} per line
    output_file: Optional[str] = None   # jsonl written here, one line per input line
    mixture_or_task_name: Optional[str] = None  # or: a registered seqio task or mixture ...
    split: str = "test"                 # ... its split (t5x's infer.gin default)
    infer_output_dir: Optional[str] = None      # ... <task>-<mode>.jsonl-00000-of-00001 per task written here
    task_feature_lengths: Optional[Mapping[str, int]] = None  # a task's features are trimmed to these
    #                                     (default: inputs max_input_length, targets max_decode_length)
    mixture_or_task_module: Any = None  # module(s) to import first: they register the task
    mode: str = "predict"           # "predict" | "score" (log-likelihood of each line's whole targets)
    max_input_length: int = 512     # inputs are truncated to this (EOS included)
    max_target_length: int = 512    # score mode: targets are truncated to this (EOS included)
    overwrite: bool = False         # replace output_file if it exists


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig(DecodeSettings):
    """`ul2lab eval` settings (gin: `EvalConfig.<field> = ...`, see gin/runs/eval.gin)."""
    mixture_or_task_name: str       # a registered seqio task or mixture
    task_feature_lengths: Mapping[str, int] = dataclasses.field(  # examples are truncated to these
        default_factory=lambda: {"inputs": 512, "targets": 114})
    split: str = "validation"
    eval_output_dir: Optional[str] = None   # metrics.json is written here
    output_file: Optional[str] = None       # also write the metrics JSON to this exact file
    max_examples: Optional[int] = None      # evaluate only the first N examples
    mixture_or_task_module: Any = None      # module(s) to import first: they register the task


# fields whose flag has another name (every other field's flag is --<field>)
FLAGS = {"checkpoint_path": "--checkpoint_dir", "mixture_or_task_name": "--mixture_or_task",
         "task_feature_lengths": "--feature_lengths"}


def flag(field: str) -> str:
    return FLAGS.get(field, f"--{field}")


def required_fields(cls) -> List[str]:
    return [f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def check_settings(settings: DecodeSettings):
    """Values from flags or gin that cannot work, named with both spellings (flag and gin field).

    Fields still unset (gin.REQUIRED while gin builds the object) are skipped: the caller names them."""
    cls = type(settings).__name__

    def name(field):
        return f"{flag(field)} ({cls}.{field})"

    for field, ok, fix in [("batch_size", lambda v: v >= 1, "a positive number"),
                           ("max_input_length", lambda v: v >= 2, "at least 2"),
                           ("max_target_length", lambda v: v >= 1, "a positive number")]:
        if not hasattr(settings, field):
            continue
        value = getattr(settings, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{name(field)} is {value!r} ({type(value).__name__}); use a number: {fix}")
        if not ok(value):
            raise UserError(f"{name(field)} {value!r} is invalid; use {fix}")
    problem = decoding.decode_settings_problem(**{f: getattr(settings, f) for f, _, _ in decoding.DECODE_SETTING_RULES
                                                  if hasattr(settings, f)})
    if problem:
        fields, what = problem
        raise UserError(f"{' and '.join(name(f) for f in fields)} {what}")
    if getattr(settings, "mode", "predict") not in ("predict", "score"):
        raise UserError(f"{name('mode')} {settings.mode!r} is invalid; use predict or score")
    if isinstance(settings, InferConfig):
        check_infer_source(settings)
    lengths = getattr(settings, "task_feature_lengths", None) or {"inputs": 1, "targets": 1}
    if (not isinstance(lengths, Mapping) or set(lengths) != {"inputs", "targets"}
            or not all(isinstance(v, int) and v >= 1 for v in lengths.values())):
        raise UserError(f"{name('task_feature_lengths')} {lengths!r} is invalid; use "
                        "{'inputs': 512, 'targets': 114} (gin) or inputs=512,targets=114 (flag)")


def check_infer_source(settings: InferConfig):
    """A jsonl file in and out, or a task with an output directory: one of the two, complete."""
    jsonl = settings.input_file is not None or settings.output_file is not None
    if jsonl and settings.mixture_or_task_name is not None:
        raise UserError("both --input_file/--output_file and --mixture_or_task given; infer a jsonl file or "
                        "a seqio task, not both")
    if jsonl:
        for field, other in (("input_file", "output_file"), ("output_file", "input_file")):
            if getattr(settings, field) is None:  # named as flag and as gin macro: either may be in use
                raise UserError(f"{flag(field)} (gin {field.upper()}) required with {flag(other)}: pass "
                                f"{flag(field)} ..., or --gin.{field.upper()}=... with --gin_file=gin/runs/infer.gin")
    elif settings.mixture_or_task_name is None:
        raise UserError("nothing to infer: pass --input_file in.jsonl --output_file out.jsonl, or "
                        "--mixture_or_task NAME --split S --infer_output_dir DIR (gin: INPUT_FILE/OUTPUT_FILE or "
                        "MIXTURE_OR_TASK_NAME/INFER_OUTPUT_DIR)")
    elif settings.infer_output_dir is None:
        raise UserError("--infer_output_dir (InferConfig.infer_output_dir, gin INFER_OUTPUT_DIR) required with "
                        "--mixture_or_task: the folder that receives <task>-<mode>.jsonl-00000-of-00001")


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
