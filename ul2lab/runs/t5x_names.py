"""t5x's gin names and what they are in ul2lab: the hint a t5x user gets for a t5x configurable,
macro or gin file, instead of gin's "unknown name".

`TABLE` maps t5x names to ul2lab's (None: no equivalent, with what to do instead); the README's
"Coming from t5x" table says the same. `check_gin_inputs` reads the gin files (and the files they
include) and the --gin. bindings before gin parses them: a t5x line becomes one error that names
each line, what to write instead, and which lines have no equivalent.
"""
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from ul2lab.errors import UserError

# (t5x name, ul2lab's equivalent or None, note). A name is `Configurable.param` or `Configurable`
# (any param), written without t5x's module alias (`utils.`, `train_script.`, ...) or scope (`train/`);
# `train` / `evaluate` / `infer` are t5x's train.py / eval.py / infer.py functions.
TABLE: Tuple[Tuple[str, Optional[str], str], ...] = (
    # train.py
    ("train.total_steps", "TRAIN_STEPS", "TrainConfig.train_steps"),
    ("train.relative_steps", "TRAIN_STEPS_RELATIVE", "TrainConfig.train_steps_relative"),
    ("train.eval_period", "EVAL_PERIOD", "TrainConfig.eval_period"),
    ("train.eval_steps", "EVAL_STEPS", "TrainConfig.eval_steps"),
    ("train.random_seed", "RANDOM_SEED", "TrainConfig.seed: init, dropout and data order"),
    ("train.model_dir", "MODEL_DIR", "TrainConfig.model_dir"),
    ("train.model", "MODEL", "a model file, gin/models/*.gin"),
    ("train.stats_period", "TrainConfig.log_period", ""),
    ("train.infer_eval_dataset_cfg", "EVAL_MIXTURE_OR_TASK_NAME", "TrainConfig.eval_mixture_or_task_name"),
    ("train.train_eval_dataset_cfg", "EVAL_STEPS",
     "the validation loss runs on the training mixture's validation split; EVAL_PERIOD = None turns evaluation off"),
    ("train.train_dataset_cfg", "MIXTURE_OR_TASK_NAME", "TrainConfig.mixture_or_task_name and the data fields"),
    ("train.checkpoint_cfg", "TrainConfig.checkpoint_period", "and keep_checkpoints, keep_period"),
    ("train.partitioner", "TrainConfig.mesh_shape", "or a file of gin/partitioning/"),
    ("train.use_hardware_rng", None, "JAX's default RNG is used; delete the line"),
    ("train.inference_evaluator_cls", None, "seqio.Evaluator is always used; delete the line"),
    ("train.trainer_cls", None, "delete the line"),
    ("train.summarize_config_fn", None, "config.gin is always written to MODEL_DIR; delete the line"),
    ("train.gc_period", None, "delete the line"),
    ("train.concurrent_metrics", None, "delete the line"),
    ("train.run_eval_before_training", None, "delete the line"),
    ("train.actions", None, "delete the line"),
    # DatasetConfig (train/, train_eval/, infer_eval/ scopes: see SCOPED)
    ("DatasetConfig.mixture_or_task_name", "MIXTURE_OR_TASK_NAME", "TrainConfig.mixture_or_task_name"),
    ("DatasetConfig.task_feature_lengths", "TASK_FEATURE_LENGTHS", "TrainConfig.task_feature_lengths"),
    ("DatasetConfig.batch_size", "BATCH_SIZE", "TrainConfig.batch_size (also the evaluations' batch size)"),
    ("DatasetConfig.shuffle", "SHUFFLE_TRAIN_EXAMPLES", "TrainConfig.shuffle_train_examples"),
    ("DatasetConfig.seed", "RANDOM_SEED", "one seed for init, dropout and data order"),
    ("DatasetConfig.use_cached", "USE_CACHED_TASKS", "TrainConfig.use_cached_tasks"),
    ("DatasetConfig.pack", "TrainConfig.pack", ""),
    ("DatasetConfig.module", "MIXTURE_OR_TASK_MODULE", "TrainConfig.mixture_or_task_module"),
    ("DatasetConfig.split", "SPLIT", "training reads 'train'; eval/infer: EvalConfig.split / InferConfig.split"),
    ("DatasetConfig.use_custom_packing_ops", None, "seqio's packing is used; delete the line"),
    ("DatasetConfig.use_memory_cache", None, "evaluation examples are always kept in memory; delete the line"),
    ("DatasetConfig", "MIXTURE_OR_TASK_NAME", "the data settings are TrainConfig fields"),
    # checkpoints
    ("SaveCheckpointConfig.period", "TrainConfig.checkpoint_period", ""),
    ("SaveCheckpointConfig.keep", "TrainConfig.keep_checkpoints", "None keeps all"),
    ("SaveCheckpointConfig.save_dataset", None, "the data position is always saved (exact resume); delete the line"),
    ("SaveCheckpointConfig.dtype", None, "parameters are saved as float32; delete the line"),
    ("SaveCheckpointConfig", "TrainConfig.checkpoint_period", "and keep_checkpoints, keep_period"),
    ("RestoreCheckpointConfig.path", "INITIAL_CHECKPOINT_PATH", "train; CHECKPOINT_PATH for eval and infer"),
    ("RestoreCheckpointConfig.mode", "EvalConfig.step", "or InferConfig.step; None: the latest step"),
    ("RestoreCheckpointConfig.dtype", None, "delete the line"),
    ("RestoreCheckpointConfig", "INITIAL_CHECKPOINT_PATH", "CHECKPOINT_PATH for eval and infer"),
    ("CheckpointConfig", "TrainConfig.checkpoint_period", "and INITIAL_CHECKPOINT_PATH"),
    # partitioning
    ("PjitPartitioner.num_partitions", "TrainConfig.mesh_shape",
     "{'data': -1, 'fsdp': 1, 'model': N}, or gin/partitioning/tensor_parallel.gin with MODEL_PARALLEL = N"),
    ("PjitPartitioner.model_parallel_submesh", "TrainConfig.mesh_shape", ""),
    ("PjitPartitioner.logical_axis_rules", "TrainConfig.logical_axis_rules", "'standard' or 'fsdp'"),
    ("PjitPartitioner", "TrainConfig.mesh_shape", "or a file of gin/partitioning/"),
    ("ModelBasedPjitPartitioner.num_partitions", "TrainConfig.mesh_shape",
     "{'data': -1, 'fsdp': 1, 'model': N}, or gin/partitioning/tensor_parallel.gin with MODEL_PARALLEL = N"),
    ("ModelBasedPjitPartitioner", "TrainConfig.mesh_shape", "or a file of gin/partitioning/"),
    ("standard_logical_axis_rules", "TrainConfig.logical_axis_rules", "'standard'"),
    # trainer, schedule, optimizer, loss
    ("Trainer.num_microbatches", "TrainConfig.num_microbatches", ""),
    ("Trainer.learning_rate_fn", "TrainConfig.learning_rate", "a schedule of gin/schedules/"),
    ("Trainer", "TrainConfig", ""),
    ("Trainer.weight_metrics_computer", None, "grad_norm is logged at every log period; delete the line"),
    ("WeightMetricsComputer", None, "grad_norm is logged at every log period; delete the line"),
    ("create_learning_rate_scheduler.factors", "TrainConfig.learning_rate",
     "'constant * rsqrt_decay' is @rsqrt_schedule() (gin/schedules/rsqrt.gin), 'constant' is @constant_schedule()"),
    ("create_learning_rate_scheduler.base_learning_rate", "rsqrt_schedule.base_learning_rate",
     "or LEARNING_RATE of gin/schedules/constant.gin"),
    ("create_learning_rate_scheduler.warmup_steps", "rsqrt_schedule.warmup_steps", ""),
    ("create_learning_rate_scheduler", "TrainConfig.learning_rate", "a schedule of gin/schedules/"),
    ("Adafactor", "make_optimizer.name", "'adafactor' (TrainConfig.optimizer = @make_optimizer)"),
    ("EncoderDecoderModel.z_loss", "Z_LOSS", "TrainConfig.z_loss"),
    ("EncoderDecoderModel.label_smoothing", "LABEL_SMOOTHING", "TrainConfig.label_smoothing"),
    ("EncoderDecoderModel.loss_normalizing_factor", "LOSS_NORMALIZING_FACTOR", "TrainConfig.loss_normalizing_factor"),
    ("EncoderDecoderModel.optimizer_def", "TrainConfig.optimizer", "@make_optimizer"),
    ("EncoderDecoderModel.input_vocabulary", None, "the task's vocabulary is used; delete the line"),
    ("EncoderDecoderModel.output_vocabulary", None, "the task's vocabulary is used; delete the line"),
    ("EncoderDecoderModel.module", "MODEL", "a model file, gin/models/*.gin"),
    ("predict_batch_with_aux.num_decodes", "EvalConfig.beam_size", "or InferConfig.beam_size, --beam_size"),
    ("EncoderDecoderModel", "MODEL", "a model file, gin/models/*.gin (MODEL = @preset())"),
    ("Transformer.config", "MODEL", "MODEL = @preset() in a model file, gin/models/*.gin"),
    ("T5Config", "preset", "preset.<field> = value: the same field names as t5x's network.T5Config"),
    ("SentencePieceVocabulary", None, "the vocabulary is the task's (`ul2lab vocab` trains one); delete the line"),
    ("beam_search", "EvalConfig.beam_size", "and alpha; InferConfig for infer"),
    ("temperature_sample", "EvalConfig.temperature", "and top_k, top_p; InferConfig for infer"),
    # evaluation and inference
    ("Evaluator.num_examples", "EVALUATOR_NUM_EXAMPLES", "TrainConfig.evaluator_num_examples; eval: --max_examples"),
    ("Evaluator.use_memory_cache", None, "examples are always kept in memory; delete the line"),
    ("Evaluator.logger_cls", None, "inference_eval/ TensorBoard and JSON are always written; delete the line"),
    ("Evaluator", None, "seqio.Evaluator is always used; delete the line"),
    ("JSONLogger", None, "delete the line"),
    ("evaluate.output_dir", "EVAL_OUTPUT_DIR", "EvalConfig.eval_output_dir"),
    ("evaluate", "EvalConfig", "gin/runs/eval.gin"),
    ("infer.mode", "MODE", "InferConfig.mode"),
    ("infer.output_dir", "INFER_OUTPUT_DIR", "InferConfig.infer_output_dir"),
    ("infer.checkpoint_period", None, "delete the line"),
    ("infer.shard_id", None, "delete the line"),
    ("infer.num_shards", None, "delete the line"),
    ("infer", "InferConfig", "gin/runs/infer.gin"),
    ("summarize_gin_config", None, "config.gin is always written to MODEL_DIR; delete the line"),
)
# names within a DatasetConfig scope that mean something else there
SCOPED = {("infer_eval", "DatasetConfig.mixture_or_task_name"): ("EVAL_MIXTURE_OR_TASK_NAME", ""),
          ("infer_eval", "DatasetConfig"): ("EVAL_MIXTURE_OR_TASK_NAME", "EVALUATOR_NUM_EXAMPLES for its size")}
# t5x macros without an equivalent (the others have the same name here)
MACROS = {"USE_HARDWARE_RNG": "JAX's default RNG is used", "EVALUATOR_USE_MEMORY_CACHE": "examples are always "
          "kept in memory", "JSON_WRITE_N_RESULTS": "every inference is written", "VOCABULARY": "the vocabulary is the "
          "task's", "OPTIMIZER": "TrainConfig.optimizer = @make_optimizer", "INIT_CHECKPOINT": "INITIAL_CHECKPOINT_PATH"}
# t5x's module aliases in its gin files: a name under one of them is t5x's
T5X_MODULES = {"train_script", "eval_script", "infer_script", "__main__", "utils", "partitioning", "trainer",
               "models", "network", "adafactor", "gin_utils", "decoding", "optimizers", "seqio", "t5x"}
# t5x's gin files and ours
INCLUDES = (("t5x/configs/runs/pretrain.gin", "runs/pretrain.gin"), ("t5x/configs/runs/finetune.gin", "runs/finetune.gin"),
            ("t5x/configs/runs/eval.gin", "runs/eval.gin"), ("t5x/configs/runs/infer.gin", "runs/infer.gin"))
T5X_MODEL_FILE = re.compile(r"t5x/examples/t5/t5_1_1/(small|base|large|xl|xxl)\.gin")
T5X_ONLY_IMPORT = re.compile(r"^\s*(from\s+__gin__\s+import|import\s+__main__\b|from\s+t5x(\.[\w.]+)?\s+import"
                             r"|import\s+t5x(\.[\w.]+)?(\s|$))")

_BY_NAME: Dict[str, Tuple[Optional[str], str]] = {name: (ours, note) for name, ours, note in TABLE}
# t5x's configurables, also when written without a module (`train.eval_period`, `DatasetConfig.seed`);
# T5Config is ours too, so it is t5x's only under t5x's module alias (`network.T5Config`)
T5X_CONFIGURABLES = {name.split(".")[0] for name, _, _ in TABLE} - {"T5Config"}


def _parts(selector: str) -> Tuple[str, List[str]]:
    """('train', ['utils', 'DatasetConfig', 'batch_size']) for 'train/utils.DatasetConfig.batch_size'."""
    scope, _, name = selector.strip().lstrip("@").rstrip("()").rpartition("/")
    return scope.split("/")[-1] if scope else "", name.split(".")


def hint(selector: str) -> Optional[str]:
    """What a t5x name is in ul2lab ("TrainConfig.checkpoint_period (...)" or "no equivalent: ..."),
    or None when the name is not t5x's."""
    scope, parts = _parts(selector)
    if len(parts) == 1 and parts[0] in MACROS:
        return MACROS[parts[0]] if parts[0] == "INIT_CHECKPOINT" else f"no equivalent: {MACROS[parts[0]]}"
    if parts[0] not in T5X_MODULES and parts[0] not in T5X_CONFIGURABLES:
        return None
    while len(parts) > 1 and parts[0] in T5X_MODULES:  # utils.X, train_script.train, t5x.utils.X
        parts = parts[1:]
    for start in range(len(parts)):  # the longest known name: Configurable.param, then Configurable
        for end in (len(parts), len(parts) - 1):
            key = ".".join(parts[start:end])
            found = (SCOPED.get((scope, key)) or _BY_NAME.get(key)) if key else None
            if found:
                ours, note = found
                if ours is None:
                    return f"no equivalent: {note}"
                if ours == "preset" and end < len(parts):  # network.T5Config.emb_dim -> preset.emb_dim
                    ours = f"preset.{parts[-1]}"
                return ours + (f" ({note})" if note else "")
    return "no equivalent in ul2lab (see the README's \"Coming from t5x\" table)"


def include_hint(path: str) -> Optional[str]:
    """Our gin file for a t5x gin file path, or None when the path is not t5x's."""
    for theirs, ours in INCLUDES:
        if path.endswith(theirs):
            return ours
    model = T5X_MODEL_FILE.search(path)
    if model:
        return f"models/t5_1_1_{model.group(1)}.gin"
    return "no equivalent" if path.startswith("t5x/") else None


def binding_hint(binding: str) -> Optional[str]:
    """A one-line message for a t5x --gin.NAME=VALUE binding, or None."""
    name = binding.split("=")[0].strip()
    found = hint(name)
    if found is None:
        return None
    return f"gin: --gin.{name} is t5x's; in ul2lab: {found} (see the README's \"Coming from t5x\")"


def t5x_lines(text: str) -> List[Tuple[int, str, str]]:
    """(line number, line, hint) for each line of a gin file's text that is t5x's."""
    found = []
    block = None  # the selector of a `selector:` block whose indented lines bind its parameters
    for number, line in enumerate(text.splitlines(), 1):
        code = line.split("#")[0].rstrip()
        if not code.strip():
            continue
        if T5X_ONLY_IMPORT.match(code):
            found.append((number, code.strip(), "no equivalent: t5x's gin syntax; delete the line"))
            continue
        include = re.match(r"\s*include\s+['\"]([^'\"]+)['\"]", code)
        if include:
            ours = include_hint(include.group(1))
            if ours:
                found.append((number, code.strip(), ours if ours == "no equivalent" else f"include '{ours}'"))
            continue
        if re.match(r"^\S[^=]*:\s*$", code):  # `selector:` opens a block: its lines are named one by one
            block = code.strip()[:-1].strip()
            continue
        if code[:1].isspace() and block:   # `  param = value` inside a block
            selector, _, value = code.strip().partition("=")
            selector = f"{block}.{selector.strip()}"
        else:
            block = None
            selector, _, value = code.partition("=")
            selector = selector.strip()
        found_hint = hint(selector)
        if found_hint is None:  # the name is ours; a value may still reference a t5x configurable
            reference = re.search(r"@([\w./]+)", value)
            found_hint = hint(reference.group(1)) if reference else None
        if found_hint is not None:
            found.append((number, code.strip(), found_hint))
    return found


def _resolve(path: str, search_paths: Sequence[str]) -> Optional[str]:
    for folder in search_paths:
        candidate = os.path.join(folder, path)
        if os.path.isfile(candidate):
            return candidate
    return None


def check_gin_inputs(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str]):
    """A UserError naming the t5x lines of the gin files (and the files they include) or a t5x
    --gin. binding, before gin parses them; nothing when all is ul2lab's."""
    for binding in bindings:
        message = binding_hint(binding)
        if message:
            raise UserError(message)
    seen = set()
    pending = list(gin_files)
    while pending:
        path = _resolve(pending.pop(0), search_paths)
        if path is None or path in seen:
            continue
        seen.add(path)
        with open(path, errors="replace") as f:
            text = f.read()
        pending += re.findall(r"^\s*include\s+['\"]([^'\"]+)['\"]", text, re.M)
        lines = t5x_lines(text)
        if lines:
            raise UserError(describe_file(path, lines))


def describe_file(path: str, lines: List[Tuple[int, str, str]]) -> str:
    """One line: the file's t5x lines without an equivalent, then the others with ours."""
    none = [f"{n} `{line}`" for n, line, h in lines if h.startswith("no equivalent")]
    renames = [f"{n} `{line}` -> {h}" for n, line, h in lines if not h.startswith("no equivalent")]
    parts = []
    if none:
        parts.append(f"no ul2lab equivalent (delete): line {', line '.join(none)}")
    if renames:
        parts.append(f"write instead: line {'; line '.join(renames)}")
    return (f"gin file {path} is written for t5x; " + ". ".join(parts)
            + " (the README's \"Coming from t5x\" lists every name)")
