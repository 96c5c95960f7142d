"""Infinite learning-rate schedule vs repeated cosine across three data phases (Beyond Cosine Decay).

Phases text -> tables -> text (embedded_text_ul2, embedded_tables_ul2, embedded_text_ul2), each
STEPS steps, every phase started from the previous phase's parameters (a fresh optimizer state, for
both schedules):
  cosine            repeated cosine: each phase warms up again to the peak and decays to the end rate
  infinite          one infinite schedule: warmup and cooldown once, then the constant rate; phase
                    k+1 continues the schedule where phase k stopped (`ul2lab train` does that when
                    INITIAL_CHECKPOINT_PATH is an infinite-schedule run)
  infinite_anneal   at each phase end, `ul2lab anneal` branches off the infinite run's checkpoint
                    ANNEAL_STEPS before the phase's end and anneals for ANNEAL_STEPS, so the branch ends at the same
                    step count as the cosine phase: equal total steps
At every phase end, held-out loss on each data seen so far (text, and tables from phase 2 on):
forgetting of earlier phases and adaptation to the current one.
"""
import os

from ul2lab.errors import UserError
from ul2lab.experiments import harness, report

NAME = "schedules"
DEFAULT_SCALE = "reduced"  # what `python -m ul2lab.experiments schedules` runs: ≤ 45 min on 2 CPU cores
PHASES = (("text", "embedded_text_ul2"), ("tables", "embedded_tables_ul2"), ("text", "embedded_text_ul2"))
DATA = {"text": "embedded_text_ul2", "tables": "embedded_tables_ul2"}
ARMS = {"cosine": "repeated cosine", "infinite": "infinite (constant phase)",
        "infinite_anneal": "infinite + anneal branch"}
SECTIONS = [
    {"title": f"Held-out loss at the end of phase {i} ({PHASES[i - 1][0]}), on each data seen so far",
     "rows": [(f"{arm}@{i}", label) for arm, label in ARMS.items()],
     "columns": [(f"{seen}_loss", f"{seen} held-out loss") for seen in sorted({d for d, _ in PHASES[:i]})]}
    for i in range(1, len(PHASES) + 1)
]
COMPARISONS = [
    (f"infinite_anneal@{i}/{data}_loss", f"cosine@{i}/{data}_loss",
     f"end of phase {i}, {data} held-out loss ({'adaptation' if j == i else 'forgetting'}): "
     "infinite + anneal (a) vs repeated cosine (b)", True)
    for i in range(1, len(PHASES) + 1)
    for data, j in sorted({d: max(k for k in range(1, i + 1) if PHASES[k - 1][0] == d)
                           for d, _ in PHASES[:i]}.items())
]


def check(s: harness.Scale):
    k, n = s.anneal_steps, s.steps_per_phase
    if not 0 < k < n or (n - k) % k:
        raise UserError(f"the anneal branch starts from a checkpoint at steps_per_phase - anneal_steps "
                        f"({n} - {k}); give anneal_steps in (0, steps_per_phase) dividing steps_per_phase - "
                        "anneal_steps")
    if n - k < s.warmup_steps + s.cooldown_steps:
        raise UserError(f"phase 1's anneal branch at step {n - k} would start before the infinite schedule's "
                        f"constant phase (warmup {s.warmup_steps} + cooldown {s.cooldown_steps})")


def run_seed(s: harness.Scale, seed: int, work_dir: str) -> tuple:
    check(s)
    n, k = s.steps_per_phase, s.anneal_steps
    keep = [f"TrainConfig.checkpoint_period = {k}", "TrainConfig.keep_checkpoints = None",
            "TrainConfig.async_checkpoints = False"]
    measurements, curves = {}, {arm: [] for arm in ARMS}
    previous = {"cosine": None, "infinite": None}
    for i, (data, task) in enumerate(PHASES, 1):
        offset = (i - 1) * n
        dirs = {arm: os.path.join(work_dir, f"{arm}_phase{i}") for arm in ARMS}
        cosine = harness.train_phase(
            [harness.model_gin(s), "runs/pretrain_ul2.gin", "schedules/cosine.gin"],
            harness.pretrain_bindings(s, seed, dirs["cosine"], task, n, previous["cosine"])
            + harness.cosine_bindings(s, n) + [f"cosine_schedule.start_step = {-offset}"])  # re-warm
        infinite = harness.train_phase(
            [harness.model_gin(s), "runs/pretrain_ul2.gin", "schedules/infinite.gin"],
            harness.pretrain_bindings(s, seed, dirs["infinite"], task, n, previous["infinite"])
            + harness.infinite_bindings(s) + keep)
        # a phase continues the previous phase's step (as t5x), so phase i ends at step i * n
        annealed = harness.anneal_branch(dirs["infinite"], dirs["infinite_anneal"], i * n - k, k,
                                         s.end_learning_rate)
        previous = {"cosine": dirs["cosine"], "infinite": dirs["infinite"]}
        for arm, phase in (("cosine", cosine), ("infinite", infinite), ("infinite_anneal", annealed)):
            curves[arm].append(phase["history"])  # steps are already counted across the phases
        seen = sorted({d for d, _ in PHASES[:i]})
        for arm in ARMS:
            for name in seen:
                measurements[f"{arm}@{i}/{name}_loss"] = harness.heldout(dirs[arm], DATA[name], s)
    return measurements, {"curves": curves, "phases": [d for d, _ in PHASES]}


def plot(results, path):
    """Learning rate (first seed) and training loss (mean over seeds) of both schedules across the
    phases, anneal branches drawn from where they start; held-out losses at each phase end."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"cosine": "tab:orange", "infinite": "tab:blue", "infinite_anneal": "tab:green"}
    fig, (lr_ax, loss_ax, held_ax) = plt.subplots(1, 3, figsize=(15, 4))
    for arm, color in colors.items():
        for phase in range(len(PHASES)):
            runs = [r["curves"][arm][phase] for r in results]
            steps = [p["step"] for p in runs[0]]
            mean_loss = [sum(run[j]["loss"] for run in runs) / len(runs) for j in range(len(steps))]
            label = ARMS[arm] if phase == 0 else None
            lr_ax.plot(steps, [p["learning_rate"] for p in runs[0]], color=color, label=label)
            loss_ax.plot(steps, mean_loss, color=color, label=label, linewidth=1)
    n = results[0]["scale"]["steps_per_phase"]
    for ax in (lr_ax, loss_ax):
        for i in range(1, len(PHASES)):
            ax.axvline(i * n, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlabel("step (all phases)")
    lr_ax.set_title("learning rate")
    loss_ax.set_title(f"training loss (mean of {len(results)} seeds)")
    lr_ax.legend(fontsize=8)
    for arm, color in colors.items():
        for name, style in (("text", "-"), ("tables", "--")):
            xs, means, halves = [], [], []
            for i in range(1, len(PHASES) + 1):
                mean, half, count = report.mean_interval(report.column(results, f"{arm}@{i}/{name}_loss"))
                if count:
                    xs.append(i)
                    means.append(mean)
                    halves.append(0.0 if half != half else half)
            held_ax.errorbar(xs, means, yerr=halves, color=color, linestyle=style, marker="o", capsize=3,
                             label=f"{ARMS[arm]}, {name}")
    held_ax.set_xticks(range(1, len(PHASES) + 1))
    held_ax.set_xticklabels([f"{i}: {d}" for i, (d, _) in enumerate(PHASES, 1)])
    held_ax.set_title("held-out loss at phase ends (95% interval)")
    held_ax.legend(fontsize=7)
    fig.tight_layout()
    report.save_figure(fig, path)
