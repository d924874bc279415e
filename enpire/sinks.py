"""Optional metric sinks fed by the fleet's progress events: TensorBoard (tensorboardX).

`[fleet] tensorboard = true` (or `enpire fleet --tensorboard`) writes every progress event as scalars
to DIR/tensorboard/, against seconds since the run started: `tensorboard --logdir DIR/tensorboard`.
Weights & Biases reads the same files (`wandb sync --sync-tensorboard DIR/tensorboard`). Install the
extra with `pip install -e ".[tensorboard]"`; a fleet asked for it without the package refuses to start.
"""

from __future__ import annotations

from pathlib import Path

from bus.messages import Progress

INSTALL_HINT = 'pip install -e ".[tensorboard]" (tensorboardX)'


class SinkUnavailable(RuntimeError):
    pass


def check_tensorboard() -> str | None:
    """None if the TensorBoard sink can be used here, else a one-line reason."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return f"fleet.tensorboard is on but tensorboardX is not installed: {INSTALL_HINT}"
    return None


class TensorBoardSink:
    """Scalars of each Progress event in a TensorBoard event file; step = whole seconds since start."""

    def __init__(self, logdir: Path, started: float) -> None:
        if reason := check_tensorboard():
            raise SinkUnavailable(reason)
        from tensorboardX import SummaryWriter
        self.logdir = Path(logdir)
        self.started = started
        self._writer = SummaryWriter(logdir=str(self.logdir), flush_secs=5)

    def write(self, p: Progress) -> None:
        step = max(0, int(p.t - self.started))
        scalars = {
            "fleet/episodes": p.episodes,
            "fleet/mru": p.mru,
            "fleet/tokens": p.tokens,
            "fleet/tokens_per_min": p.tokens_per_min,
            "fleet/time_left_s": p.time_left_s,
            "champion/success_confirmed": p.champion_success,
            "champion/n_confirmed": p.champion_n,
        }
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step, walltime=p.t)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
