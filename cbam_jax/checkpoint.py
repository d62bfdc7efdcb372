"""Orbax checkpoints of a training run: `latest/` (every epoch) and `best/` (by test accuracy).

Each checkpoint holds the train state (params, batch_stats, optimizer state, step, PRNG key)
and a JSON record of the rest (epoch, plateau schedule, metric histories, settings), which is
everything a resumed run needs to finish exactly as an uninterrupted one would.
"""
from pathlib import Path

import orbax.checkpoint as ocp

ITEMS = ("state", "meta")


class Checkpoints:
    """Synchronous saves: a checkpoint is complete on disk before the next epoch starts. Orbax
    writes to a temporary directory and renames it, so a kill never leaves half a one; the
    temporary directory a kill leaves behind is removed when the run is resumed.

    Nothing is created on disk until the first save: looking for a checkpoint to resume from
    leaves no empty directories behind.
    """

    def __init__(self, directory):
        self.directory = Path(directory).absolute()
        self._managers = {}

    def _manager(self, name: str, create: bool = False) -> ocp.CheckpointManager | None:
        if name not in self._managers:
            if not create and not (self.directory / name).is_dir():
                return None
            options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False,
                                                   cleanup_tmp_directories=True)
            self._managers[name] = ocp.CheckpointManager(self.directory / name, options=options,
                                                         item_names=ITEMS)
        return self._managers[name]

    def save(self, epoch: int, state, meta: dict, is_best: bool):
        """best/ first, then latest/, whose checkpoint commits the epoch: a kill between the two
        leaves the epoch uncommitted, so the resumed run repeats it (bit for bit) and finds
        best/ already holding it. The other order would lose that best checkpoint for good."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(meta))
        if is_best:
            best = self._manager("best", create=True)
            if epoch not in best.all_steps():  # else saved by a run killed before the commit
                best.save(epoch, args=args)
        self._manager("latest", create=True).save(epoch, args=args)

    def latest_epoch(self) -> int | None:
        manager = self._manager("latest")
        return None if manager is None else manager.latest_step()

    def latest_meta(self) -> dict:
        """The JSON record of the latest checkpoint alone (no arrays are read)."""
        manager = self._require("latest")
        return manager.restore(manager.latest_step(),
                               args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore_latest(self, target):
        """(state shaped like `target`, meta) of the latest checkpoint."""
        return self._restore("latest", target)

    def restore_best(self, target):
        return self._restore("best", target)

    def _require(self, name: str) -> ocp.CheckpointManager:
        manager = self._manager(name)
        if manager is None or manager.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {self.directory / name}")
        return manager

    def _restore(self, name, target):
        manager = self._require(name)
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def close(self):
        for manager in self._managers.values():
            manager.close()


# --- reading one checkpoint for inference (cbam_jax.inference) -------------------------------

def step_directory(path, which: str = "best") -> Path:
    """The checkpoint that `path` names, as its step directory (`.../checkpoints/best/7`).

    `path` may be a run directory or its `checkpoints/` (then `which`, 'best' or 'latest', picks
    one), a `best/` or `latest/` directory (its newest step), or a step directory itself. Only
    the file system is read, so no JAX backend starts (a CPU device count can still be set).
    """
    if which not in ("best", "latest"):
        raise ValueError(f"which: expected 'best' or 'latest', got {which!r}")
    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory; expected a run directory, its "
                                f"checkpoints/, checkpoints/best or latest, or one step in them")
    if all((path / item).is_dir() for item in ITEMS):
        return path
    for sub in ("checkpoints", which):
        if (path / sub).is_dir():
            path = path / sub
    # Orbax names each step by its number; a save that a kill interrupted is a '*.orbax-
    # checkpoint-tmp-*' directory beside them, never a bare number.
    steps = [p for p in path.iterdir() if p.name.isdigit() and p.is_dir()]
    if not steps:
        raise FileNotFoundError(
            f"{path} holds no checkpoint: expected a run directory (with checkpoints/best or "
            f"latest), a checkpoints/ directory, best/ or latest/, or a step directory in them "
            f"(with {' and '.join(f'{i}/' for i in ITEMS)})")
    return max(steps, key=lambda p: int(p.name))


def read_meta(step_dir) -> dict:
    """The JSON record of one checkpoint step (epoch, data set, settings, history)."""
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(Path(step_dir).absolute()
                                                                 / "meta")


def restore_variables(step_dir, target) -> dict:
    """The model's {'params', 'batch_stats'} of one checkpoint step, shaped and placed like
    `target` (e.g. jax.ShapeDtypeStructs with a sharding). The optimizer's state is not read:
    inference needs only the variables, whatever the optimizer was."""
    return ocp.PyTreeCheckpointer().restore(
        Path(step_dir).absolute() / "state", args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))
