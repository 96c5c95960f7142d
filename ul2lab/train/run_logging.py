"""What a person sees during and after a run: a progress line, metrics.jsonl, TensorBoard, a loss PNG.

metrics.jsonl holds one JSON object per logged step ({"step": 100, "loss": 3.2, "learning_rate":
0.01, ...}) and one per evaluation ({"step": 1000, "training_eval/<task>/loss": 3.1,
"inference_eval/<task>/<metric>": ...}). TensorBoard, laid out as t5x's (written with tensorboardX,
which needs no TensorFlow): training scalars in MODEL_DIR/train (t5x's names among them: loss,
accuracy, cross_ent_loss, z_loss, learning_rate, nonpadding_fraction, timing/...), validation loss in
MODEL_DIR/training_eval/<task>, inference metrics in MODEL_DIR/inference_eval/<task> tagged
eval/<metric> (seqio's TensorBoardLogger naming). The loss curve is drawn with matplotlib into loss.png.
"""
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional

from ul2lab.files import atomic_path

TENSORBOARD_TRAIN_DIR = "train"  # t5x's name for the training scalars' folder in MODEL_DIR
INFERENCE_TAG_PREFIX = "eval/"   # seqio's TensorBoardLogger tags inference metrics eval/<metric>


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(step: int, total_steps: int, metrics: Dict[str, float], eta_s: Optional[float]) -> str:
    parts = [f"step {step}/{total_steps}", f"loss {metrics['loss']:.4f}"]
    if "accuracy" in metrics:
        parts.append(f"acc {metrics['accuracy']:.3f}")
    if "learning_rate" in metrics:
        parts.append(f"lr {metrics['learning_rate']:.3g}")
    if "tokens_per_s" in metrics:
        parts.append(f"{metrics['tokens_per_s']:,.0f} tok/s")
    if metrics.get("mfu") is not None:
        parts.append(f"MFU {100 * metrics['mfu']:.2f}%")
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


class RunLogger:
    """Writes each logged step to the console, metrics.jsonl and TensorBoard; `close` adds PNG + summary."""

    def __init__(self, model_dir: str, total_steps: int, start_step: int = 0, tensorboard: bool = True,
                 stream=None, write_files: Optional[bool] = None):
        self.model_dir, self.total_steps, self.start_step = model_dir, total_steps, start_step
        self.stream = stream or sys.stdout
        if write_files is None:
            # every host of a multi-host run logs the same global metrics: process 0 writes the files
            import jax
            write_files = jax.process_index() == 0
        self.write_files = write_files
        os.makedirs(model_dir, exist_ok=True)
        self.jsonl = open(os.path.join(model_dir, "metrics.jsonl"), "a") if write_files else None
        self.history: List[Dict[str, float]] = []
        self.eval_history: List[Dict[str, float]] = []
        self.start_time = time.time()
        self._first_log = None
        self.tensorboard = tensorboard and write_files
        self._eval_writers = {}
        self.writer = self._tensorboard_writer(TENSORBOARD_TRAIN_DIR) if self.tensorboard else None

    def _tensorboard_writer(self, subdir: str):
        from tensorboardX import SummaryWriter
        return SummaryWriter(logdir=os.path.join(self.model_dir, subdir))

    def _write_scalars(self, record: Dict[str, float]):
        for name, value in record.items():
            if name != "step":
                self.writer.add_scalar(name, value, global_step=int(record["step"]))
        self.writer.flush()

    def log(self, step: int, metrics: Dict[str, float]):
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items() if v is not None}}
        self.history.append(record)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.writer is not None:
            self._write_scalars(record)
        # ETA from the pace since the first log (the time before it holds compilation)
        now = time.time()
        eta = None
        if self._first_log is None:
            self._first_log = (step, now)
        elif step > self._first_log[0]:
            eta = (now - self._first_log[1]) / (step - self._first_log[0]) * (self.total_steps - step)
        print(progress_line(step, self.total_steps, record, eta), file=self.stream, flush=True)

    def announce_eval(self, step: int, what: str):
        """The progress line says when an evaluation starts (it can take a while)."""
        print(f"step {step}/{self.total_steps} | eval: {what} ...", file=self.stream, flush=True)

    def log_eval(self, step: int, results: Dict[str, Dict[str, Dict[str, float]]], seconds: float):
        """{kind: {task: {metric: value}}} (kind training_eval / inference_eval) to metrics.jsonl
        ("<kind>/<task>/<metric>" keys), TensorBoard (MODEL_DIR/<kind>/<task>) and the console."""
        record = {"step": int(step)}
        shown = []
        for kind, tasks in sorted(results.items()):
            for task, metrics in sorted(tasks.items()):
                record.update({f"{kind}/{task}/{name}": float(value) for name, value in metrics.items()})
                shown.append(f"{kind}/{task}: " + ", ".join(
                    f"{name} {value:.4g}" for name, value in sorted(metrics.items()) if name != "target_tokens"))
                if self.tensorboard:
                    key = os.path.join(kind, task)
                    if key not in self._eval_writers:
                        self._eval_writers[key] = self._tensorboard_writer(key)
                    prefix = INFERENCE_TAG_PREFIX if kind == "inference_eval" else ""
                    for name, value in metrics.items():
                        self._eval_writers[key].add_scalar(prefix + name, float(value), global_step=int(step))
                    self._eval_writers[key].flush()
        self.eval_history.append(record)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        print(f"step {step}/{self.total_steps} | eval done in {format_duration(seconds)} | "
              + (" | ".join(shown) or "no eval task had data"), file=self.stream, flush=True)

    def close(self, final_step: int, checkpoint_step: Optional[int] = None) -> str:
        """Draw loss.png, print and return the run summary, close files."""
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
        for writer in self._eval_writers.values():
            writer.close()
        png = os.path.join(self.model_dir, "loss.png")
        points = ([(r["step"], r["loss"]) for r in _whole_run(os.path.join(self.model_dir, "metrics.jsonl"))]
                  if self.write_files else [])
        if len(points) >= 2:
            write_loss_png(png, points)
        summary = self.summary(final_step, checkpoint_step, png if len(points) >= 2 else None)
        print(summary, file=self.stream, flush=True)
        return summary

    def summary(self, final_step: int, checkpoint_step: Optional[int], png: Optional[str]) -> str:
        lines = [f"run finished at step {final_step} in {format_duration(time.time() - self.start_time)}"
                 f" ({final_step - self.start_step} steps this session)"]
        if self.history:
            first, last = self.history[0], self.history[-1]
            lines.append(f"  loss {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} "
                         f"(step {last['step']})")
            rates = [r["tokens_per_s"] for r in self.history if "tokens_per_s" in r]
            if rates:
                lines.append(f"  throughput {sum(rates) / len(rates):,.0f} target+input tokens/s (mean of logs)")
        if checkpoint_step is not None:
            lines.append(f"  checkpoint: {self.model_dir}/{checkpoint_step}")
        lines.append(f"  metrics: {self.model_dir}/metrics.jsonl" + (f", loss curve: {png}" if png else ""))
        return "\n".join(lines)


def _whole_run(jsonl_path: str) -> List[dict]:
    """Logged records of all sessions of a run merged by step (training and eval records of a step
    are separate lines), the latest value winning for a repeated step."""
    by_step = {}
    with open(jsonl_path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step) if "loss" in by_step[s]]


def write_loss_png(path: str, points):
    """Loss against step (matplotlib, Agg backend: no display needed), written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps = [p[0] for p in points if math.isfinite(p[1])]
    losses = [p[1] for p in points if math.isfinite(p[1])]
    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    axes.plot(steps, losses, color="tab:blue")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
