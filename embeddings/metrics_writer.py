"""Where training metrics go: metrics.jsonl, TensorBoard, the console.

Only process 0 writes. `WORKDIR/metrics.jsonl` holds one JSON object per
logged step (`step`, `loss`, `learning_rate`, `grad_norm`, `pairs_per_second`,
...) and one per evaluation (`step` and `eval/<name>/<metric>` keys). A resumed
run appends; entries past the resumed step (written after the checkpoint the
run went back to) are dropped first, so each step appears once, and that
rewrite replaces the file whole (a crash then leaves the old file or the new).
"""

import json
import math
import sys

from absl import logging
from etils import epath
from tqdm import tqdm

from embeddings import workdir as workdir_files

CONSOLE_KEYS = (
    ("loss", "loss {:.4f}"),
    ("accuracy", "acc {:.3f}"),
    ("learning_rate", "lr {:.2e}"),
    ("grad_norm", "|g| {:.3f}"),
    ("steps_per_second", "{:.2f} steps/s"),
    ("pairs_per_second", "{:.1f} pairs/s"),
    ("tokens_per_second", "{:.0f} tok/s"),
    ("mfu", "MFU {:.1%}"),
)


def _tensorboardx_writer():
    """tensorboardX's `SummaryWriter`, imported without torch.

    tensorboardX imports torch, where it is installed, only to recognise torch
    tensors (it falls back to numpy when the import fails); the writer here is
    given floats. Imported with torch hidden, train.py's process never loads
    torch: ~190 MiB less peak memory and a second less to start.
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is here
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _jsonable(value):
    value = float(value) if not isinstance(value, (int, str)) else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricWriter:
    """Writes metric dicts to the workdir and the console.

    Args:
      workdir: the run's folder (local or gs://).
      enabled: False on every process but the first.
      resume_step: step the run continues from; later lines of an earlier
        attempt are dropped from metrics.jsonl.
    """

    def __init__(self, workdir, *, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self._tensorboard = None
        if not enabled:
            return
        self.path = epath.Path(workdir) / workdir_files.METRICS
        # Object stores (gs://) cannot append: there the whole file is rewritten
        # from these lines at each write (a few thousand short lines at most).
        self._remote = "://" in str(self.path)
        self._lines = []
        if self.path.exists():
            self._lines = [
                json.dumps(record)
                for record in workdir_files.read_metrics(workdir)
                if record.get("step", 0) <= resume_step
            ]
            workdir_files.write_atomically(self.path, "".join(x + "\n" for x in self._lines))
        try:
            SummaryWriter = _tensorboardx_writer()
            self._tensorboard = SummaryWriter(str(epath.Path(workdir) / workdir_files.TENSORBOARD))
        except ImportError:  # TensorBoard is optional; metrics.jsonl is always written
            logging.warning("tensorboardX is not installed: no TensorBoard event files.")

    def write(self, step: int, metrics: dict, *, eta_seconds: float | None = None) -> None:
        """Appends one record and prints a concise line."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        line = json.dumps(record)
        self._lines.append(line)
        if self._remote:
            self.path.write_text("".join(x + "\n" for x in self._lines))
        else:
            with self.path.open("a") as f:
                f.write(line + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    # TensorBoard tags allow no '@' (mrr@10 -> mrr_at_10).
                    self._tensorboard.add_scalar(key.replace("@", "_at_"), value, step)
            self._tensorboard.flush()
        parts = [f"step {step}"]
        parts += [fmt.format(metrics[k]) for k, fmt in CONSOLE_KEYS if k in metrics]
        parts += [f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("eval/")]
        if eta_seconds is not None:
            parts.append(f"ETA {_duration(eta_seconds)}")
        tqdm.write(" | ".join(parts), file=sys.stdout)  # keeps a progress bar intact
        sys.stdout.flush()

    def progress_bar(self, total: int, initial: int):
        """A tqdm bar over the steps on an interactive terminal (process 0), else a no-op one."""
        return tqdm(
            total=total,
            initial=initial,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.enabled and sys.stdout.isatty()),
        )

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
