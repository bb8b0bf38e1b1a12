"""How a run starts and ends: where it lives, what it continues from, the checks that come first.

Every check (the checkpoint's model, the data, the init file) runs before the run folder is
created or touched, so a refused start leaves the disk as it was. Rank 0 decides; every rank
learns its decision or its error (`decided_by_main`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import checkpoint, flight_recorder, resilience, rundir
from ..data import DataError, build_data, dataset_fingerprint
from ..distributed import decided_by_main, on_main_first
from ..config import ConfigError
from ..export import ExportError, load_single_device
from ..files import StorageError, write_text_atomic
from ..weights import split_state


@dataclass
class Plan:
    path: str  # the run folder
    source: str  # a run folder or checkpoint to continue from ("" for none)
    existing: bool  # the folder is an earlier run's (resume, restart)
    note: str = ""  # what to tell the user


def _plan(cfg, layout) -> Plan:
    """Where the run lives and what it continues from; writes nothing."""
    run = cfg.run
    if run.resume and not run.eval_only:
        rundir.check_resumable(Path(run.resume))
        return Plan(run.resume, run.resume, True)
    earlier = resilience.recall_run_dir(layout.store)
    if earlier is not None:  # torchrun restarted the group: continue the run an earlier attempt started
        found = None if run.eval_only else checkpoint.latest_good(earlier / "checkpoints")
        note = (f"restart {resilience.restart_count()}: continuing {earlier} "
                + ("from its last good checkpoint" if found else "from the start (no checkpoint yet)"))
        return Plan(str(earlier), str(earlier) if found else "", True, note)
    path = rundir.plan_new(cfg, prefix="eval-" if run.eval_only else "")
    return Plan(str(path), run.resume if run.eval_only else "", False)


def start(trainer) -> None:
    """Plan, check, build the data, then (and only then) create or reopen the run folder and restore."""
    cfg, layout = trainer.cfg, trainer.layout
    plan = decided_by_main(layout, lambda: _plan(cfg, layout), _errors())
    if plan.note:
        trainer.say(plan.note)
    source = decided_by_main(layout, lambda: _check_source(trainer, plan), _errors())
    trainer.data = on_main_first(layout, lambda: _build(trainer), _errors())  # rank 0 fills the cache
    trainer.data_check = trainer.data.fingerprint_for(cfg.data.check) if _checked(cfg) and layout.is_main else None
    path = Path(plan.path)
    held = []  # the lock stays with rank 0, the only writer of the folder
    decided_by_main(layout, lambda: held.append(_open_folder(trainer, plan)), _errors())
    trainer.lock = held[0] if held else None
    trainer.run_path = path
    flight_recorder.point_flight_recorder(path)
    trainer.attach_data(trainer.data)
    _restore(trainer, source, plan.existing)


def _errors() -> tuple:
    """What a start-up decision may fail with, in one line, on every rank."""
    return (ConfigError, DataError, ExportError, StorageError, checkpoint.CheckpointError, rundir.RunDirError)


def _check_source(trainer, plan: Plan) -> str:
    """The checkpoint folder to continue from ("" for none), checked against this model."""
    cfg = trainer.cfg
    if plan.source:
        folder, manifest = checkpoint.resolve(plan.source)
        checkpoint.check_compatible(folder, manifest, cfg.model_hash(), trainer.layout.dims.mp)
        return str(folder)
    if cfg.run.init_from:
        load_single_device(cfg.run.init_from, cfg.model)  # refuses a file of another network
    return ""


def _checked(cfg) -> bool:
    """Whether the data is checked between epochs (generated and prepared sets do not change)."""
    return cfg.data.check != "off" and cfg.data.dataset == "folder"


def _build(trainer):
    cfg = trainer.cfg
    progress = trainer.progress.callback("data") if trainer.layout.is_main else None
    return build_data(cfg, cache_dir=Path(cfg.run.out_dir) / ".cache", progress=progress)


def _open_folder(trainer, plan: Plan):
    """Rank 0 takes the folder: created, or reopened (locked first, then its config rewritten)."""
    path, cfg = Path(plan.path), trainer.cfg
    lock = rundir.reopen(path, cfg) if plan.existing else rundir.create(path, cfg)
    if not plan.existing:
        resilience.remember_run_dir(trainer.layout.store, path)
    return lock


def _restore(trainer, source: str, existing: bool) -> None:
    cfg, layout = trainer.cfg, trainer.layout
    data = trainer.data
    trainer.say(f"data: {cfg.data.dataset}, {len(data.train)} training and {len(data.val)} validation images, "
                f"{len(data.classes)} classes")
    _report_skipped(trainer)
    if source:
        folder, manifest = checkpoint.resolve(source)
        if manifest.get("data_fingerprint", data.fingerprint) != data.fingerprint:
            trainer.say(f"warning: the data set differs from the one {folder} was trained on; continuing with it")
        payload = checkpoint.load_column(folder, layout.column, trainer.device)
        trainer.load_state_dict(payload, manifest, weights_only=cfg.run.eval_only)
        if not cfg.run.eval_only:
            trainer.on_main(lambda: rundir.truncate_metrics(trainer.run_path, trainer.state.epoch,
                                                            last_step=trainer.state.step))
        st = trainer.state
        trainer.say(f"resumed from {folder} (epoch {st.epoch + 1}, batch {st.batch}, step {st.step})")
    elif cfg.run.init_from:
        state, _ = load_single_device(cfg.run.init_from, cfg.model)
        trainer.model.load_state_dict(state if layout.dims.mp == 1 else split_state(state, cfg.model, layout.column))
        trainer.say(f"initialised from {cfg.run.init_from}")
    elif existing and not cfg.run.eval_only:  # a restart before the first checkpoint starts over
        trainer.on_main(lambda: rundir.truncate_metrics(trainer.run_path, 0, last_step=0))
    if trainer.steps_per_epoch == 0 and not cfg.run.eval_only:
        raise DataError(f"the training set ({len(data.train)} images) is smaller than one global batch "
                        f"({trainer.global_batch}); lower train.batch_size")
    trainer.say(f"run directory: {trainer.run_path}; {trainer.steps_per_epoch} steps per epoch; "
                f"{layout.dims.dp} replica(s) x {layout.dims.mp} process(es) on {trainer.device}")


def _report_skipped(trainer) -> None:
    """Files the data scan left out: counted on the console, listed in RUN/skipped_files.txt."""
    data = trainer.data
    skipped = [f"unreadable\t{p}" for p in data.skipped_files] + [f"link\t{p}" for p in data.skipped_links]
    if skipped:
        listing = trainer.run_path / "skipped_files.txt"
        trainer.on_main(lambda: write_text_atomic(listing, "".join(line + "\n" for line in skipped)))
        trainer.say(f"warning: {len(data.skipped_files)} unreadable images and {len(data.skipped_links)} links "
                    f"out of their class folder were left out; the list is in {listing}")


def check_data(trainer) -> None:
    """Between epochs: the data folder must not have changed (data.check), decided by rank 0 under the
    patient start-up timeout, so a slow file system cannot trip the short one."""
    cfg = trainer.cfg
    if not _checked(cfg):  # the same answer on every rank
        return

    def check():
        if dataset_fingerprint(cfg, mode=cfg.data.check) != trainer.data_check:
            raise DataError(f"the data set changed during the run ({cfg.data.root}: files added, removed or "
                            f"modified); the checkpoint of epoch {trainer.state.epoch} is intact. Restore the data, "
                            f"or resume (run.resume={trainer.run_path}) to continue on the new contents")
    trainer.set_timeouts(cfg.dist.startup_timeout_s)
    decided_by_main(trainer.layout, check, (DataError, StorageError))
    trainer.set_timeouts(cfg.dist.timeout_s)


def evaluate_only(trainer) -> dict:
    """run.eval_only: the weights (checkpoint, file or fresh), evaluated into a run folder of its own."""
    centre = trainer.evaluate()
    record = {k: None for k in rundir.METRIC_KEYS}
    record.update(epoch=trainer.state.epoch, val_loss=centre["loss"], val_top1=centre["top1"], val_top5=centre["top5"])
    if trainer.cfg.data.ten_crop:
        tc = trainer.evaluate(ten_crop=True)
        record.update(val_tencrop_top1=tc["top1"], val_tencrop_top5=tc["top5"])
    record["unreadable_images"] = trainer.report_unreadable()
    trainer.on_main(lambda: rundir.append_metrics(trainer.run_path, record))
    trainer.say(trainer.on_main(lambda: rundir.write_summary(trainer.run_path, {"run_dir": str(trainer.run_path),
                                                                                **record})))
    return record


def finish(trainer) -> dict:
    """The run's summary (rank 0 writes summary.json), and how to continue a stopped run."""
    st, run_path = trainer.state, trainer.run_path
    if trainer.stopping:
        trainer.say(f"stopped after step {st.step} on a stop signal (SIGTERM or SIGINT), checkpoint written; "
                    f"continue with run.resume={run_path}")
    elif st.epoch < trainer.cfg.train.epochs:
        trainer.say(f"stopped at step {st.step} (train.max_steps); continue with run.resume={run_path} "
                    f"train.max_steps=0")
    records = rundir.read_metrics(run_path) if trainer.layout.is_main else []
    summary = {"run_dir": str(run_path), "epochs": len(records), "steps": st.step, "skipped_steps": st.skipped}
    if records:
        last = records[-1]
        summary.update({k: v for k, v in last.items() if k.startswith("val_")},
                       best_val_top1=max(r["val_top1"] for r in records),
                       seconds=sum(r["seconds"] for r in records), images_per_sec=last["images_per_sec"])
    trainer.say(trainer.on_main(lambda: rundir.write_summary(run_path, summary)))
    return summary
