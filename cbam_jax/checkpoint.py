"""Orbax checkpoints of a training run: `latest/` (every epoch) and `best/` (by test accuracy).

Each checkpoint holds the train state (params, batch_stats, optimizer state, step, PRNG key)
and a JSON record of the rest (epoch, plateau schedule, metric histories, settings), which is
everything a resumed run needs to finish exactly as an uninterrupted one would.
"""
from pathlib import Path

import orbax.checkpoint as ocp


class Checkpoints:
    """Synchronous saves: a checkpoint is complete on disk before the next epoch starts
    (orbax writes to a temporary directory and renames it, so a kill never leaves half a one)."""

    def __init__(self, directory):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False)
        self.latest = ocp.CheckpointManager(self.directory / "latest", options=options,
                                            item_names=("state", "meta"))
        self.best = ocp.CheckpointManager(self.directory / "best", options=options,
                                          item_names=("state", "meta"))

    def save(self, epoch: int, state, meta: dict, is_best: bool):
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(meta))
        self.latest.save(epoch, args=args)
        if is_best:
            self.best.save(epoch, args=args)

    def latest_epoch(self) -> int | None:
        return self.latest.latest_step()

    def restore_latest(self, target):
        """(state shaped like `target`, meta) of the latest checkpoint."""
        return self._restore(self.latest, target)

    def restore_best(self, target):
        return self._restore(self.best, target)

    def _restore(self, manager, target):
        epoch = manager.latest_step()
        if epoch is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {manager.directory}")
        restored = manager.restore(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def close(self):
        self.latest.close()
        self.best.close()
