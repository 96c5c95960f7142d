"""What a person sees during and after a run: a progress line, metrics.jsonl, TensorBoard, a loss PNG.

metrics.jsonl holds one JSON object per logged step ({"step": 100, "loss": 3.2, "learning_rate":
0.01, ...}); TensorBoard event files go to MODEL_DIR/tensorboard (TensorFlow is imported only
when the logger starts, and the run goes on without it if it is missing). The loss curve is
drawn into a PNG by hand (zlib + a 3x5 pixel font), so no plotting library is needed.
"""
import json
import math
import os
import struct
import sys
import time
import zlib
from typing import Dict, List, Optional


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
        self.start_time = time.time()
        self._first_log = None
        self.writer = self._tensorboard_writer() if tensorboard and write_files else None

    def _tensorboard_writer(self):
        try:
            import tensorflow as tf
        except ImportError:
            return None
        return tf.summary.create_file_writer(os.path.join(self.model_dir, "tensorboard"))

    def _write_scalars(self, record: Dict[str, float]):
        # tf.summary.scalar needs the tensorboard package; tf.summary.write with the "scalars" plugin
        # tag writes the same event records with TensorFlow alone
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
        with self.writer.as_default(step=int(record["step"])):
            for name, value in record.items():
                if name != "step":
                    tf.summary.write(name, tf.constant(value, tf.float32), metadata=metadata)
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

    def close(self, final_step: int, checkpoint_step: Optional[int] = None) -> str:
        """Draw loss.png, print and return the run summary, close files."""
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
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
    """Logged records of all sessions of a run, the latest record winning for a repeated step."""
    by_step = {}
    with open(jsonl_path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step) if "loss" in by_step[s]]


# ---------------------------------------------------------------------------------------------
# A loss curve PNG without a plotting library.

_GLYPHS = {  # 3x5 bitmaps, rows top to bottom: digits and the letters of the axis labels
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "e": "000111111100111", " ": "000000000000000", "l": "110010010010111", "o": "000111101101111",
    "s": "000111110011111", "t": "010111010010011", "p": "000111101111100",
}


def _text(canvas, x: int, y: int, text: str, scale: int = 2):
    for i, ch in enumerate(text):
        bits = _GLYPHS.get(ch, _GLYPHS[" "])
        for r in range(5):
            for c in range(3):
                if bits[r * 3 + c] == "1":
                    for dy in range(scale):
                        for dx in range(scale):
                            _set(canvas, x + i * 4 * scale + c * scale + dx, y + r * scale + dy, (0, 0, 0))


def _set(canvas, x, y, color):
    if 0 <= y < len(canvas) and 0 <= x < len(canvas[0]) // 3:
        canvas[y][3 * x:3 * x + 3] = bytes(color)


def _line(canvas, x0, y0, x1, y1, color):
    n = max(abs(x1 - x0), abs(y1 - y0), 1)
    for i in range(n + 1):
        _set(canvas, round(x0 + (x1 - x0) * i / n), round(y0 + (y1 - y0) * i / n), color)


def write_loss_png(path: str, points, width: int = 640, height: int = 400):
    """Loss against step: axes, the curve in blue, min/max labels for both axes."""
    left, right, top, bottom = 70, 20, 20, 40
    canvas = [bytearray(b"\xff" * (3 * width)) for _ in range(height)]
    steps = [p[0] for p in points]
    losses = [p[1] for p in points if math.isfinite(p[1])] or [0.0]
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1.0
    s0, s1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1

    def xy(step, loss):
        x = left + (step - s0) / (s1 - s0) * (width - left - right)
        y = top + (hi - loss) / (hi - lo) * (height - top - bottom)
        return round(x), round(y)

    _line(canvas, left, top, left, height - bottom, (0, 0, 0))
    _line(canvas, left, height - bottom, width - right, height - bottom, (0, 0, 0))
    previous = None
    for step, loss in points:
        if not math.isfinite(loss):
            continue
        current = xy(step, loss)
        if previous is not None:
            _line(canvas, *previous, *current, (31, 119, 180))
        previous = current
    _text(canvas, 4, top, f"{hi:.3g}")
    _text(canvas, 4, height - bottom - 10, f"{lo:.3g}")
    _text(canvas, left, height - bottom + 8, str(s0))
    _text(canvas, width - right - 4 * 2 * len(str(s1)), height - bottom + 8, str(s1))
    _text(canvas, 4, (top + height - bottom) // 2, "loss")
    _text(canvas, (left + width - right) // 2 - 16, height - bottom + 8, "step")
    raw = b"".join(b"\x00" + bytes(row) for row in canvas)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)
