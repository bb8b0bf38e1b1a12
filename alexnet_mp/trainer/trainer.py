"""The Trainer: builds a run (model, optimiser, schedule, data), owns its one training step,
its epochs and evaluation, and the state its checkpoints carry (torchtitan's ``trainer.py``)."""
from __future__ import annotations

import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from .. import checkpoint, preemption, resilience, rundir
from ..distributed import RunFailed, configure_backends, decided_by_main, sum_over_replicas
from ..files import StorageError, append_line
from ..progress import Progress
from ..schedule import LRSchedule
from ..weights import build_column, build_reference, dropout_generator
from ..data import Loaders
from . import startup
from ..callbacks import CallbackList
from .evaluate import evaluate
from .guard import PendingStep, StepGuard, StepResult
from .inputs import InputPipeline
from .metrics import EpochMeter, StepLog, open_tensorboard
from .optim import build_optimizer, conform_state, lr_factor, set_lr


class NonFiniteError(RuntimeError):
    """A loss or gradient was NaN or infinite."""


@dataclass
class TrainState:
    """Where the run is: what checkpoints carry besides the weights."""

    epoch: int = 0  # epochs finished
    batch: int = 0  # batches of the current epoch done
    step: int = 0  # training steps taken (a skipped non-finite step counts)
    skipped: int = 0  # steps whose update was skipped (run.nonfinite=skip)
    partial: dict | None = None  # the epoch's running sums at a mid-epoch checkpoint
    best_top1: float | None = None  # the best validation top-1 so far


def _quiet(*args, **kwargs) -> None:
    pass


def dropout_seed(seed: int, step: int) -> int:
    """The dropout masks of a step are drawn from (seed, step): the same on every rank and after a resume."""
    return (seed * 1_000_003 + step) % (1 << 63)


class Trainer:
    def __init__(self, cfg, layout, callbacks=(), link=None):
        self.cfg, self.layout, self.device = cfg, layout, layout.device
        self.callbacks = CallbackList(callbacks)
        configure_backends(cfg.train.deterministic, cfg.dist.tf32)
        # Generous until the first step has run; `link` replaces the pair's link (benchmarks).
        self.link = link if link is not None else layout.link(cfg.dist.startup_timeout_s)
        self.model = self._build_model()
        self.net = self.model if layout.dims.dp == 1 else DistributedDataParallel(
            self.model, process_group=layout.dp_group,
            device_ids=[self.device] if self.device.type == "cuda" else None)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.schedule = LRSchedule(cfg.train)
        self.dropout_rng = dropout_generator(cfg.train.seed, self.device)
        self.model.set_dropout_generator(self.dropout_rng, layout.dp_rank, layout.dims.dp)
        self.guard = StepGuard(self.device, sticky=cfg.run.nonfinite == "error")
        self.state = TrainState()
        self.progress = Progress(layout.is_main and cfg.run.progress, cfg.run.log_every)
        self.say = print if layout.is_main else _quiet
        self.lr_factor = lr_factor(cfg.train, layout.dims.dp)
        self.global_batch = cfg.train.batch_size * layout.dims.dp
        self.data = self.loaders = self.inputs = self.run_path = self.lock = None
        self.steplog, self.meter, self.stopping, self.fast = None, None, False, False
        self.pending: deque[PendingStep] = deque()
        self.unreadable: list[str] = []  # images replaced while training (data.bad_images=skip)
        self.failure: str | None = None  # this rank's error outside the step, told to every rank
        self.data_wait, self.last_tick = 0.0, None

    def attach_data(self, bundle) -> None:
        """Train and evaluate on `bundle` (data.build_data's): its loaders and the input pipeline."""
        layout = self.layout
        self.data = bundle
        self.loaders = Loaders(bundle, self.cfg, layout.dp_rank, layout.dims.dp, layout.column, layout.dims.mp)
        self.inputs = InputPipeline(bundle, self.cfg, layout, self.link)

    def _build_model(self):
        cfg, d = self.cfg, self.cfg.dist
        if self.layout.dims.mp == 1:
            return build_reference(cfg.model, cfg.train.seed, self.device, amp=d.amp, channels_last=d.channels_last)
        return build_column(cfg.model, self.layout.column, self.link, cfg.train.seed, self.device,
                            overlap=d.overlap, amp=d.amp, channels_last=d.channels_last)

    # ------------------------------------------------------------------ the step

    def train_step(self, batch) -> PendingStep:
        """One training step on a loader batch: input, forward, backward, the ranks' agreement,
        the update. Nothing here waits for the device; the outcome settles one step later."""
        st = self.state
        self.dropout_rng.manual_seed(dropout_seed(self.cfg.train.seed, st.step + 1))
        images, labels = self.inputs(batch)
        logits = self.net(images)
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        with self._backward_guard():
            loss.backward()
        flags = self.guard.agree(loss, self.model.parameters(), bool(preemption.stop_requested()),
                                 failed=self.failure is not None)
        self.optimizer.found_inf = self.guard.skip_flag(flags)  # the update is skipped on the device
        self.optimizer.step()
        correct = (logits.argmax(1) == labels).sum()
        now = time.perf_counter()
        meta = {"step": st.step + 1, "epoch": st.epoch, "batch": st.batch, "images": len(labels),
                "data_wait_s": self.data_wait, "seconds": now - (self.last_tick or now),
                "lr": self.optimizer.param_groups[0]["lr"]}
        st.step, st.batch, self.last_tick, self.data_wait = st.step + 1, st.batch + 1, now, 0.0
        self._fail_fast()
        return self.guard.pending(flags, loss, correct, meta)

    def _backward_guard(self):
        # Only the replicas' gradient all-reduce runs inside backward as a collective; the pair's
        # exchanges report their own failures.
        if self.layout.dims.dp == 1:
            return nullcontext()
        return resilience.guarded("backward (with the data-parallel gradient all-reduce)", self.layout.dp_group)

    def _fail_fast(self) -> None:
        """Once a step has run, every wait on another rank gets the short timeout."""
        if not self.fast:
            self.fast = True
            self.set_timeouts(self.cfg.dist.timeout_s)

    def set_timeouts(self, seconds: float) -> None:
        resilience.set_timeouts(seconds, self.link, (self.layout.mp_group, self.layout.dp_group))

    # ------------------------------------------------------------------ settling steps

    def settle(self, keep: int = 0) -> None:
        """Read the outcome of every pending step but the newest `keep` (their copies are done by now)."""
        while len(self.pending) > keep:
            self._settled(self.pending.popleft().settle())

    def _settled(self, result: StepResult) -> None:
        if result.failed:
            self._fail_together()
        if not result.finite:
            where = f"step {result.step} (epoch {result.epoch + 1}, batch {result.batch})"
            if self.cfg.run.nonfinite == "error":
                raise NonFiniteError(f"non-finite loss or gradient at {where}; the weights were not updated "
                                     f"from then on and the last checkpoint is intact; lower train.lr, or set "
                                     f"run.nonfinite=skip to skip such steps")
            self.state.skipped += 1
            self.say(f"warning: skipped {where}: non-finite loss or gradient ({self.state.skipped} skipped so far)")
        self.stopping = self.stopping or result.stop
        if self.meter is not None:
            self.meter.add(result)
        if self.steplog is not None:
            self.steplog.add(result)
        self.callbacks.on_step_settled(self, result)

    # ------------------------------------------------------------------ epochs

    @property
    def steps_per_epoch(self) -> int:
        return len(self.data.train) // self.global_batch

    def lr_for(self, epoch: int) -> float:
        return self.schedule.lr(epoch) * self.lr_factor

    def _batches(self, loader):
        """The loader's batches, the next one's copy to the device issued while the current step runs."""
        it = iter(loader)

        def fetch():
            self.callbacks.on_batch_wait(self)
            start = time.perf_counter()
            batch = next(it, None)
            self.data_wait += time.perf_counter() - start
            if batch is None:
                return None
            self.unreadable.extend(batch.unreadable)
            return self.inputs.prefetch(batch)

        ready = fetch()
        while ready is not None:
            batch, ready = ready, fetch()
            yield batch

    def run_epoch(self, epoch: int) -> None:
        """Train epoch `epoch` from the state's batch on; ends it (evaluation, checkpoint) when complete."""
        st = self.state
        set_lr(self.optimizer, self.lr_for(epoch))
        self.net.train()
        self.meter, st.partial = EpochMeter(st.partial), None
        title = f"epoch {epoch + 1}/{self.cfg.train.epochs}"
        self.last_tick = time.perf_counter()  # step times start here, not at the last evaluation's end
        with self.progress.task(title, self.steps_per_epoch, st.batch) as task:
            for batch in self._batches(self.loaders.train(epoch, st.batch)):
                self.callbacks.on_step_begin(self, batch)
                self.pending.append(self.train_step(batch))
                self.callbacks.on_step_end(self)
                self.settle(keep=1)  # the previous step: done on the device long ago
                task.update(1, **self._figures())
                if self._pause():
                    break
        self.settle()
        if st.batch == self.steps_per_epoch:
            self._end_epoch(epoch)

    def _figures(self) -> dict:
        m = self.meter
        if not m.seen:
            return {}
        return {"loss": f"{m.loss / m.seen:.3f}", "acc": f"{m.correct / m.seen:.3f}",
                "img/s": f"{m.seen * self.layout.dims.dp / max(m.elapsed(), 1e-9):.0f}"}

    def _pause(self) -> bool:
        """After a step: checkpoint when due or stopping; True when the run stops now."""
        st, run = self.state, self.cfg.run
        stop = self.stopping or bool(self.cfg.train.max_steps and st.step >= self.cfg.train.max_steps)
        due = bool(run.checkpoint_every and st.step % run.checkpoint_every == 0)
        if (stop or due) and st.batch < self.steps_per_epoch:  # at an epoch's end the epoch checkpoint follows
            self.settle()  # may raise on a non-finite step, or reveal a stop
            self.save_checkpoint("step")
        return stop or self.stopping

    def _end_epoch(self, epoch: int) -> None:
        seconds = self.meter.elapsed()  # training only: evaluation is not in the epoch's images/s
        val = self.evaluate()
        self.schedule.observe(val["loss"])
        loss_sum, correct, seen = sum_over_replicas([self.meter.loss, self.meter.correct, self.meter.seen],
                                                    self.layout)
        record = {"epoch": epoch + 1, "step": self.state.step, "train_loss": loss_sum / max(seen, 1),
                  "train_top1": correct / max(seen, 1), "val_loss": val["loss"], "val_top1": val["top1"],
                  "val_top5": val["top5"], "lr": self.lr_for(epoch), "images_per_sec": seen / max(seconds, 1e-9),
                  "seconds": seconds}
        if epoch + 1 == self.cfg.train.epochs and self.cfg.data.ten_crop:
            tc = self.evaluate(ten_crop=True)
            record.update(val_tencrop_top1=tc["top1"], val_tencrop_top5=tc["top5"])
        record["unreadable_images"] = self.report_unreadable()
        st = self.state
        st.epoch, st.batch, self.meter = epoch + 1, 0, None
        st.best_top1 = val["top1"] if st.best_top1 is None else max(st.best_top1, val["top1"])
        # Before the checkpoint: a resume from an older one truncates it away.
        self.on_main(lambda: (rundir.append_metrics(self.run_path, record), rundir.plot(self.run_path)))
        self.save_checkpoint("epoch", best_metric=val["top1"])
        self.say(f"epoch {epoch + 1}: train loss {record['train_loss']:.3f} top-1 {record['train_top1']:.3f} | "
                 f"val loss {val['loss']:.3f} top-1 {val['top1']:.3f} top-5 {val['top5']:.3f} | "
                 f"lr {record['lr']:g} | {record['images_per_sec']:.0f} img/s")
        self.callbacks.on_epoch_end(self, record)

    def report_unreadable(self) -> int:
        """Images the loaders replaced this epoch, from every rank: listed in RUN/skipped_files.txt."""
        found = [None] * self.layout.dims.world_size
        torch.distributed.all_gather_object(found, self.unreadable)
        self.unreadable = []
        late = sorted({p for paths in found for p in paths})
        if late:
            self.on_main(lambda: append_line(self.run_path / "skipped_files.txt",
                                             "".join(f"unreadable\t{p}\n" for p in late)))
            self.say(f"warning: {len(late)} unreadable images were replaced by others of their class this epoch; "
                     f"listed in {self.run_path / 'skipped_files.txt'}")
        return len(late)

    def evaluate(self, ten_crop: bool = False) -> dict:
        return evaluate(self, ten_crop)

    # ------------------------------------------------------------------ the run

    def fit(self) -> dict:
        """Start (or resume) the run, train to the end or to a stop, and return its summary."""
        startup.start(self)
        error = None
        try:
            if self.cfg.run.eval_only:
                return startup.evaluate_only(self)
            self.steplog = StepLog(self.cfg.run.log_every, self.layout.dims.dp,
                                   write=self._write_steps, tensorboard=open_tensorboard(
                                       self.run_path, self.cfg.run.tensorboard and self.layout.is_main))
            self.callbacks.on_fit_start(self)
            first = self.state.epoch
            while self.state.epoch < self.cfg.train.epochs and not self._stopped():
                if self.state.epoch > first:
                    startup.check_data(self)
                self.run_epoch(self.state.epoch)
            return startup.finish(self)
        except BaseException as e:
            error = e
            raise
        finally:
            self.callbacks.on_fit_end(self, error)
            self.close()

    def _stopped(self) -> bool:
        return self.stopping or bool(self.cfg.train.max_steps and self.state.step >= self.cfg.train.max_steps)

    def _write_steps(self, records: list) -> None:
        """Rank 0's per-step record; a failed write stops every rank at the next agreement, with its reason."""
        if self.layout.is_main and self.failure is None:
            try:
                rundir.append_steps(self.run_path, records)
            except StorageError as e:
                self.failure = str(e)

    def _fail_together(self) -> None:
        """Some rank failed outside the step: every rank raises that rank's error."""
        errors = [None] * self.layout.dims.world_size
        torch.distributed.all_gather_object(errors, self.failure)
        raise RunFailed(next(e for e in errors if e is not None))

    def on_main(self, fn):
        """fn() on rank 0 (its writes); a failure there stops every rank with the same one-line reason."""
        return decided_by_main(self.layout, fn, (StorageError,))

    def close(self) -> None:
        """Stop the loader workers and release the run folder."""
        if self.loaders is not None:
            self.loaders.close()
        if self.steplog is not None and self.steplog.tensorboard is not None:
            self.steplog.tensorboard.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> tuple[dict, dict]:
        """(this process's payload, the run's manifest): everything a checkpoint holds."""
        st, cfg = self.state, self.cfg
        manifest = {"config": cfg.to_dict(), "model_hash": cfg.model_hash(), "world_size": self.layout.dims.world_size,
                    "mp": self.layout.dims.mp, "data_fingerprint": self.data.fingerprint,
                    "classes": self.data.classes,
                    "trainer": {"epoch": st.epoch, "images_in_epoch": st.batch * self.global_batch, "step": st.step,
                                "schedule": self.schedule.state_dict(), "partial": st.partial,
                                "skipped": st.skipped, "best_top1": st.best_top1}}
        payload = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                   "column": self.layout.column, "data_stats": self.data.stats}
        return payload, manifest

    def load_state_dict(self, payload: dict, manifest: dict, weights_only: bool = False) -> None:
        """Continue from a checkpoint (or only take its weights)."""
        self.model.load_state_dict(payload["model"])
        if weights_only:
            return
        self.optimizer.load_state_dict(payload["optimizer"])
        conform_state(self.optimizer)
        t, st = manifest["trainer"], self.state
        st.epoch, st.step, st.skipped = t["epoch"], t["step"], t.get("skipped", 0)
        st.best_top1 = t.get("best_top1")
        # Positions are kept in images, so a run can resume with another number of replicas.
        st.batch, leftover = divmod(t["images_in_epoch"], self.global_batch)
        if leftover:
            self.say(f"warning: resuming with a global batch of {self.global_batch} repeats {leftover} images of "
                     f"epoch {st.epoch + 1} (the checkpoint stopped after {t['images_in_epoch']})")
        self.schedule.load_state_dict(t["schedule"])
        st.partial = t.get("partial") if self.layout.dp_rank == 0 else None

    def save_checkpoint(self, kind: str, best_metric: float | None = None) -> None:
        """Write a checkpoint of both columns (every pending step settled first)."""
        layout, st = self.layout, self.state
        self.settle()
        if kind == "step":
            st.partial = self._replica_sums(self.meter.sums())
        payload, manifest = self.state_dict()
        st.partial = None
        error = None
        if layout.dp_rank == 0:  # one copy of each column, from the first replica
            try:
                checkpoint.save(self.run_path / "checkpoints", st.step, layout.column, payload, manifest,
                                self.cfg.run.keep_checkpoints, layout.mp_group, kind=kind, best_metric=best_metric)
            except (checkpoint.CheckpointError, StorageError) as e:
                error = e
        if layout.dims.dp > 1:
            # The other replicas learn the outcome here, under the patient start-up timeout,
            # rather than in the next gradient all-reduce under the short one.
            self.set_timeouts(self.cfg.dist.startup_timeout_s)
            outcomes = [None] * layout.dims.world_size
            with resilience.guarded("wait for the first replica's checkpoint"):
                torch.distributed.all_gather_object(outcomes, None if error is None else str(error))
            self.set_timeouts(self.cfg.dist.timeout_s)
            if error is None and any(outcomes):
                raise RunFailed(next(o for o in outcomes if o))
        if error is not None:
            raise error

    def _replica_sums(self, sums: dict) -> dict:
        """The epoch so far over every replica: a resume, with any number of replicas, carries it on the first."""
        if self.layout.dims.dp == 1:
            return sums
        loss, correct, seen = sum_over_replicas([sums["loss"], sums["correct"], sums["seen"]], self.layout)
        return dict(sums, loss=loss, correct=int(correct), seen=int(seen))
