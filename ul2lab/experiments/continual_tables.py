"""Continual table pretraining (table-T5): does continuing on tables help table tasks, and what does
it cost on text?

Per seed: one text-pretrained checkpoint (UL2 MoD on embedded_text_ul2, the infinite schedule), then
three arms at equal continuation steps, each with gin/runs/continual_tables.gin (which continues the
base run's infinite schedule in its constant phase):
  tables  continued on embedded_continual_tables (table denoisers + table MoD + text)
  text    continued on embedded_text_ul2 (text only)
  none    the base checkpoint, not continued
Each arm: held-out loss on text (embedded_text_ul2) and tables (embedded_tables_ul2) validation;
then finetuned (gin/runs/finetune.gin) on WikiTQ random-split-1-train and scored (denotation
accuracy) on the first examples of random-split-1-dev, and finetuned on TabFact's validation
statements of half its tables (tabfact_val_by_table, split by table) and scored on the held-apart
tables' statements.
"""
import os

from ul2lab.errors import UserError
from ul2lab.experiments import harness, report
from ul2lab_tasks import tables as table_tasks

NAME = "continual_tables"
DEFAULT_SCALE = "reduced"  # what `python -m ul2lab.experiments continual_tables` runs: ≤ 45 min on 2 CPU cores
ARMS = {"tables": "continued on tables + text", "text": "continued on text only", "none": "not continued"}
CONTINUE_TASKS = {"tables": "embedded_continual_tables", "text": "embedded_text_ul2"}
HELDOUT = {"text": "embedded_text_ul2", "tables": "embedded_tables_ul2"}
DOWNSTREAM = {"wikitq": ("wikitq", "denotation_accuracy"), "tabfact": ("tabfact_val_by_table", "accuracy")}
SECTIONS = [
    {"title": "Held-out loss after continued pretraining (cross entropy per target token)",
     "rows": list(ARMS.items()),
     "columns": [("text_loss", "text held-out loss"), ("tables_loss", "tables held-out loss")]},
    {"title": "Finetuned accuracy (%): WikiTQ random-split-1-dev (denotation), TabFact held-apart tables",
     "rows": list(ARMS.items()), "digits": 1,
     "columns": [("wikitq_accuracy", "WikiTQ dev accuracy"), ("tabfact_accuracy", "TabFact accuracy")]},
]
COMPARISONS = [
    ("tables/wikitq_accuracy", "text/wikitq_accuracy", "WikiTQ accuracy: tables (a) vs text (b)", False),
    ("tables/tabfact_accuracy", "text/tabfact_accuracy", "TabFact accuracy: tables (a) vs text (b)", False),
    ("tables/wikitq_accuracy", "none/wikitq_accuracy", "WikiTQ accuracy: tables (a) vs not continued (b)", False),
    ("tables/tables_loss", "text/tables_loss", "tables held-out loss: tables (a) vs text (b)", True),
    ("tables/text_loss", "text/text_loss", "text held-out loss (forgetting): tables (a) vs text (b)", True),
]


def check_data():
    """The downstream data must be there before any training (UL2LAB_DATA_DIR or --data_dir)."""
    try:
        root = table_tasks.table_data_dir()
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    for need in ("wikitq/data/random-split-1-train.tsv", "wikitq/data/random-split-1-dev.tsv",
                 "tabfact/val_examples.json", "tabfact/all_csv"):
        if not os.path.exists(os.path.join(root, need)):
            raise UserError(f"{os.path.join(root, need)} does not exist; point --data_dir (or UL2LAB_DATA_DIR) "
                            "at the folder holding wikitq/ and tabfact/")


def run_seed(s: harness.Scale, seed: int, work_dir: str) -> tuple:
    check_data()
    n = s.steps_per_phase
    base = os.path.join(work_dir, "base")
    curves = {"base": harness.train_phase(
        [harness.model_gin(s), "runs/pretrain_ul2.gin", "schedules/infinite.gin"],
        harness.pretrain_bindings(s, seed, base, "embedded_text_ul2", n) + harness.infinite_bindings(s))["history"]}
    arms = {"none": base}
    for arm, task in CONTINUE_TASKS.items():
        arms[arm] = os.path.join(work_dir, arm)
        curves[arm] = harness.train_phase(
            [harness.model_gin(s), "runs/continual_tables.gin"],
            harness.pretrain_bindings(s, seed, arms[arm], task, n, base) + harness.infinite_bindings(s))["history"]
    measurements = {}
    for arm, model_dir in arms.items():
        for name, task in HELDOUT.items():
            measurements[f"{arm}/{name}_loss"] = harness.heldout(model_dir, task, s)
        for name, (task, metric) in DOWNSTREAM.items():
            finetuned = os.path.join(work_dir, f"{arm}_{name}")
            harness.train_phase(
                [harness.model_gin(s), "runs/finetune.gin"],
                [f"MODEL_DIR = {finetuned!r}", f"MIXTURE_OR_TASK_NAME = {task!r}",
                 f"INITIAL_CHECKPOINT_PATH = {model_dir!r}", f"TRAIN_STEPS = {s.finetune_steps}",
                 f"TRAIN_STEPS_RELATIVE = {s.finetune_steps}",
                 f"BATCH_SIZE = {s.finetune_batch_size}", f"TASK_FEATURE_LENGTHS = {s.finetune_lengths()!r}"]
                + harness.run_bindings(seed))
            scores = harness.eval_task(finetuned, task, s, os.path.join(finetuned, "eval.json"))
            measurements[f"{arm}/{name}_accuracy"] = float(scores[metric])
    return measurements, {"curves": curves}


def plot(results, path):
    report.bar_plot(results, SECTIONS, path)
