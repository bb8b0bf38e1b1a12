"""Train the two-column AlexNet: one process per column.

    torchrun --nproc_per_node=2 launch/train.py [--config FILE] [key=value ...]

Any even number of processes runs D = processes / 2 data-parallel replicas of
the pair (README, "Scaling out"), on one node or on several:

    torchrun --nproc_per_node=8 launch/train.py ...                       # 4 replicas
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=FIRST_NODE:29500 --rdzv_id=RUN launch/train.py ...  # 8 replicas

Without --config it trains the small network of configs/small.yaml on the
built-in data set. The script reads top to bottom: configuration, processes,
run directory, data, model, resume, the epoch loop, the end.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a plain checkout too

from alexnet_mp import checkpoint, resilience, rundir  # noqa: E402
from alexnet_mp.config import ConfigError, build_config, parse_overrides  # noqa: E402
from alexnet_mp.data import DataError, build_data, dataset_fingerprint, eval_loader, train_loader  # noqa: E402
from alexnet_mp.distributed import LaunchError, setup, teardown  # noqa: E402
from alexnet_mp.exchange import PeerError  # noqa: E402
from alexnet_mp.export import ExportError, load_single_device  # noqa: E402
from alexnet_mp.model import build_column, dropout_generator, param_groups, split_state  # noqa: E402
from alexnet_mp.profiler import NullProfiler, profiling  # noqa: E402
from alexnet_mp.schedule import LRSchedule  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "small.yaml"
# Errors that explain themselves: printed as one line, without a traceback.
USER_ERRORS = (ConfigError, LaunchError, DataError, ExportError, PeerError,
               checkpoint.CheckpointError, rundir.RunDirError)


class NonFiniteError(RuntimeError):
    """A loss or gradient was NaN or infinite."""


def load_config(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG.relative_to(ROOT)})")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.epochs=5")
    args = parser.parse_intermixed_args(argv)
    run_overrides = parse_overrides(args.overrides).get("run", {})
    if run_overrides.get("resume"):  # continue with the run's own config; overrides still apply
        base = rundir.load_run_config(run_overrides["resume"])
        if run_overrides.get("eval_only") is True:  # evaluation writes a run of its own, not the trained run's name
            base["run"]["name"] = ""
        return build_config(args.config, args.overrides, base=base)
    return build_config(args.config or DEFAULT_CONFIG, args.overrides)


class RunFailed(RuntimeError):
    """An error one rank found, raised on every rank."""


def decided_by_main(layout, fn):
    """fn() run on rank 0 alone; its result, or its error, reaches every rank.

    The other ranks must learn of rank 0's failure instead of waiting for it in
    a collective until the timeout.
    """
    box = [None, None]
    if layout.is_main:
        try:
            box = [fn(), None]
        except USER_ERRORS as e:
            box = [None, str(e)]
    with resilience.guarded("broadcast of rank 0's start-up decision"):
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise RunFailed(box[1])
    return box[0]


def on_main_first(layout, fn):
    """fn() on rank 0, then on the others: for work that fills a shared cache."""
    kept = []
    decided_by_main(layout, lambda: kept.append(fn()))
    return kept[0] if layout.is_main else fn()


def sum_over_replicas(values, layout) -> list[float]:
    """Add up per-replica figures (a list, or a float64 tensor on the device), read once.

    Both columns of a pair hold the same figures, so the sum runs over the data-parallel group.
    """
    t = torch.as_tensor(values, dtype=torch.float64, device=layout.device)
    if layout.dims.dp > 1:
        dist.all_reduce(t, group=layout.dp_group)
    return t.tolist()


@torch.no_grad()
def evaluate(model, loader, layout, ten_crop=False) -> dict:
    model.eval()
    device = layout.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, images; read once at the end
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if ten_crop:  # average the softmax over the ten views of each image
            probs = F.softmax(model(images.flatten(0, 1)), dim=1).view(images.shape[0], 10, -1).mean(1)
        else:
            probs = F.softmax(model(images), dim=1)
        top5 = probs.topk(min(5, probs.shape[1]), dim=1).indices
        sums[:3] += torch.stack([F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum").double(),
                                 (top5[:, 0] == labels).sum().double(),
                                 (top5 == labels[:, None]).any(1).sum().double()])
        sums[3] += len(labels)
    loss, top1, top5, n = sum_over_replicas(sums, layout)
    return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n}


def train(cfg, layout, prof=NullProfiler()) -> dict:
    say = print if layout.is_main else (lambda *a, **k: None)
    device, column = layout.device, layout.column
    eval_only = cfg.run.eval_only
    resuming = bool(cfg.run.resume) and not eval_only

    # --- run directory: rank 0 names and creates it, everyone learns the path. After a restart
    # by torchrun, the run an earlier attempt started continues from its last good checkpoint.
    def make_run_dir():
        if resuming:
            return rundir.prepare(cfg, Path(cfg.run.resume), resuming=True), ""
        earlier = resilience.recall_run_dir(layout.store)
        if earlier is not None:
            found = None if eval_only else checkpoint.latest_good(earlier / "checkpoints")
            if found is None:
                rundir.truncate_metrics(earlier, 0)
            say(f"restart {resilience.restart_count()}: continuing {earlier} "
                + ("from its last good checkpoint" if found else "from the start (no checkpoint yet)"))
            return rundir.prepare(cfg, earlier, resuming=True), str(earlier) if found else ""
        name = cfg.run.name or ("eval-" if eval_only else "") + rundir.default_name()
        path = rundir.prepare(cfg, Path(cfg.run.out_dir) / name, resuming=False)
        resilience.remember_run_dir(layout.store, path)
        return path, ""
    run_path, restart_source = decided_by_main(layout, make_run_dir)
    resilience.point_flight_recorder(run_path)

    # --- data: identical on both columns; rank 0 first so it alone fills the cache
    data = on_main_first(layout, lambda: build_data(cfg, cache_dir=Path(cfg.run.out_dir) / ".cache"))
    say(f"data: {cfg.data.dataset}, {len(data.train)} training and {len(data.val)} validation images, "
        f"{len(data.classes)} classes" + (f", {data.skipped} unreadable images skipped" if data.skipped else ""))

    # --- model, optimiser, schedule
    link = layout.link(cfg.dist.startup_timeout_s)  # generous until the first step has run
    model = build_column(cfg.model, column, link, cfg.train.seed, device, overlap=cfg.dist.overlap,
                         amp=cfg.dist.amp, channels_last=cfg.dist.channels_last)
    dropout_rng = dropout_generator(cfg.train.seed, device)
    model.set_dropout_generator(dropout_rng, layout.dp_rank, layout.dims.dp)
    # fused: one pass over the weights per step, the same numbers as the default
    # loop and a quarter of its time on CPU (README, "Benchmarks").
    optimizer = torch.optim.SGD(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                momentum=cfg.train.momentum, fused=True)
    schedule = LRSchedule(cfg.train)
    lr_factor = layout.dims.dp if cfg.train.lr_scaling == "linear" else 1
    global_batch = cfg.train.batch_size * layout.dims.dp
    start_epoch, start_batch, step, partial = 0, 0, 0, None

    # --- where to start: a checkpoint of this run, or a single-device file
    source = cfg.run.resume or restart_source
    skipped = 0  # steps skipped for a non-finite loss or gradient (run.nonfinite=skip)
    if source:
        folder, manifest = checkpoint.resolve(source)
        checkpoint.check_compatible(folder, manifest, cfg.model_hash())
        if manifest.get("data_fingerprint", data.fingerprint) != data.fingerprint:
            say(f"warning: the data set differs from the one {folder} was trained on; continuing with it")
        state = checkpoint.load_column(folder, column, device)
        model.load_state_dict(state["model"])
        if not eval_only:
            optimizer.load_state_dict(state["optimizer"])
            dropout_rng.set_state(state["dropout_rng"].cpu())
            trainer = manifest["trainer"]
            start_epoch, step = trainer["epoch"], trainer["step"]
            # Positions are kept in images, so a run can resume with another number of replicas.
            start_batch, leftover = divmod(trainer["images_in_epoch"], global_batch)
            if leftover:
                say(f"warning: resuming with a global batch of {global_batch} repeats {leftover} images of "
                    f"epoch {start_epoch + 1} (the checkpoint stopped after {trainer['images_in_epoch']})")
            schedule.load_state_dict(trainer["schedule"])
            partial = trainer.get("partial") if layout.dp_rank == 0 else None
            skipped = trainer.get("skipped", 0)
            if layout.is_main:
                rundir.truncate_metrics(run_path, start_epoch)
        say(f"resumed from {folder} (epoch {start_epoch + 1}, batch {start_batch}, step {step})")
    elif cfg.run.init_from:
        ref_state, _ = load_single_device(cfg.run.init_from, cfg.model)
        model.load_state_dict(split_state(ref_state, cfg.model, column))
        say(f"initialised from {cfg.run.init_from}")

    def save_checkpoint(epoch, batch, sums):
        if sums is not None and layout.dims.dp > 1:
            # The epoch so far, every replica's share: a resume, with any number of replicas,
            # carries it on the first replica alone.
            loss_sum, correct, seen = sum_over_replicas([sums["loss"], sums["correct"], sums["seen"]], layout)
            sums = dict(sums, loss=loss_sum, correct=int(correct), seen=int(seen))
        if layout.dp_rank == 0:  # one copy of each column, from the first replica
            write_checkpoint(epoch, batch, sums)
        if layout.dims.dp > 1:
            # The other replicas wait for the write here, under the patient start-up timeout,
            # rather than in the next gradient all-reduce under the short one.
            groups = (layout.mp_group, layout.dp_group)
            resilience.set_timeouts(cfg.dist.startup_timeout_s, link, groups)
            with resilience.guarded("wait for the first replica's checkpoint"):
                dist.barrier()
            resilience.set_timeouts(cfg.dist.timeout_s, link, groups)

    def write_checkpoint(epoch, batch, sums):
        manifest = {"config": cfg.to_dict(), "model_hash": cfg.model_hash(), "world_size": layout.dims.world_size,
                    "mp": layout.dims.mp, "data_fingerprint": data.fingerprint,
                    "classes": data.classes, "mean": data.mean, "std": data.std,
                    "trainer": {"epoch": epoch, "images_in_epoch": batch * global_batch, "step": step,
                                "schedule": schedule.state_dict(), "partial": sums, "skipped": skipped}}
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "dropout_rng": dropout_rng.get_state(), "column": column}
        checkpoint.save(run_path / "checkpoints", step, column, payload, manifest,
                        cfg.run.keep_checkpoints, layout.mp_group)

    ten_crop = cfg.data.ten_crop and data.val_ten_crop is not None
    # Replicas average each column's gradients over the data-parallel group,
    # bucketed and overlapped with backward; the pair's exchanges stay inside the pair.
    net = model if layout.dims.dp == 1 else DistributedDataParallel(
        model, process_group=layout.dp_group, device_ids=[device] if device.type == "cuda" else None)

    def val_batches(ten_crop=False):  # each replica evaluates its share; figures are summed
        return eval_loader(data, cfg, ten_crop=ten_crop, dp_rank=layout.dp_rank, dp_size=layout.dims.dp)
    if eval_only:
        centre = evaluate(net, val_batches(), layout)
        record = {k: None for k in rundir.METRIC_KEYS}
        record.update(epoch=start_epoch, val_loss=centre["loss"], val_top1=centre["top1"], val_top5=centre["top5"])
        if ten_crop:
            tc = evaluate(net, val_batches(True), layout, ten_crop=True)
            record.update(val_tencrop_top1=tc["top1"], val_tencrop_top5=tc["top5"])
        if layout.is_main:
            rundir.append_metrics(run_path, record)
            say(rundir.write_summary(run_path, {"run_dir": str(run_path), **record}))
        return record

    # --- the epoch loop
    steps_per_epoch = len(data.train) // global_batch
    if steps_per_epoch == 0:
        raise DataError(f"the training set ({len(data.train)} images) is smaller than one global batch "
                        f"({global_batch}); lower train.batch_size")
    say(f"run directory: {run_path}; {steps_per_epoch} steps per epoch; "
        f"{layout.dims.dp} replica(s) x 2 columns on {device}")
    def check_data_unchanged():
        if dataset_fingerprint(cfg) != data.fingerprint:
            raise DataError(f"the data set changed during the run ({cfg.data.root or cfg.data.dataset}: files "
                            f"added, removed or modified); the checkpoint of epoch {epoch} is intact. Restore "
                            f"the data, or resume (run.resume={run_path}) to continue on the new contents")

    record, stop, preempted, fail_fast = {}, False, False, False
    # Only the all-reduce between replicas runs inside backward as a collective; a pair's own
    # exchanges report their failures themselves.
    backward_guard = (lambda: resilience.guarded("backward (with the data-parallel gradient all-reduce)",
                                                 layout.dp_group)) if layout.dims.dp > 1 else nullcontext
    prof.attach(model, link, optimizer, run_path, ddp=net if net is not model else None)
    for epoch in range(start_epoch, cfg.train.epochs):
        if epoch > start_epoch:
            decided_by_main(layout, check_data_unchanged)  # one scan, one verdict for every rank
        lr = schedule.lr(epoch) * lr_factor
        for group in optimizer.param_groups:
            group["lr"] = lr
        net.train()
        sums = partial or {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        partial = None
        # Loss and correct answers add up on the device and are read only when shown or saved:
        # reading them every step would make the host wait for the device every step.
        running = torch.zeros(2, dtype=torch.float64, device=device)

        def fold_running():
            loss_sum, correct = running.tolist()
            running.zero_()
            sums["loss"] += loss_sum
            sums["correct"] += int(correct)
        bar = tqdm(total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   disable=not (layout.is_main and cfg.run.progress), mininterval=1.0, dynamic_ncols=True)
        tick = time.perf_counter()
        batches = prof.batches(train_loader(data, cfg, epoch, start_batch, layout.dp_rank, layout.dims.dp))
        for batch, (images, labels) in enumerate(batches, start=start_batch):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = net(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            with backward_guard():
                loss.backward()
            finite, preempted = resilience.step_verdict(loss, model, device, bool(resilience.stop_requested()))
            if not finite:
                where = f"step {step + 1} (epoch {epoch + 1}, batch {batch})"
                if cfg.run.nonfinite == "error":
                    raise NonFiniteError(f"non-finite loss or gradient at {where}; the weights were not updated "
                                         f"and the last checkpoint is intact; lower train.lr, or set "
                                         f"run.nonfinite=skip to skip such steps")
                skipped += 1
                say(f"warning: skipped {where}: non-finite loss or gradient ({skipped} skipped so far)")
                continue  # a stop request stays raised: the next step stops
            optimizer.step()
            step += 1
            if not fail_fast:  # start-up (or resume) is over: fail fast from now on
                resilience.set_timeouts(cfg.dist.timeout_s, link, (layout.mp_group, layout.dp_group))
                fail_fast = True
            running += torch.stack([loss.detach().double() * len(labels), (logits.argmax(1) == labels).sum().double()])
            sums["seen"] += len(labels)
            prof.step_end()
            bar.update(1)
            # Only a shown bar needs the running figures; reading them waits for the device.
            if not bar.disable and ((batch + 1) % 10 == 0 or batch + 1 == steps_per_epoch):
                fold_running()
                elapsed = sums["seconds"] + time.perf_counter() - tick
                bar.set_postfix(loss=f"{sums['loss'] / sums['seen']:.3f}", acc=f"{sums['correct'] / sums['seen']:.3f}",
                                img_s=f"{sums['seen'] * layout.dims.dp / max(elapsed, 1e-9):.0f}")
            stop = preempted or (cfg.train.max_steps and step >= cfg.train.max_steps)
            if stop or (cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0):
                if batch + 1 < steps_per_epoch:  # at an epoch's end the epoch checkpoint follows
                    fold_running()
                    save_checkpoint(epoch, batch + 1, dict(sums, seconds=sums["seconds"] + time.perf_counter() - tick))
            if stop:
                break
        bar.close()
        fold_running()
        if stop and batch + 1 < steps_per_epoch:
            if not preempted:
                say(f"stopped at step {step} (train.max_steps); continue with run.resume={run_path} train.max_steps=0")
            break
        sums["seconds"] += time.perf_counter() - tick
        start_batch = 0
        val = evaluate(net, val_batches(), layout)
        schedule.observe(val["loss"])
        loss_sum, correct, seen = sum_over_replicas([sums["loss"], sums["correct"], sums["seen"]], layout)
        record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(seen, 1),
                  "train_top1": correct / max(seen, 1), "val_loss": val["loss"],
                  "val_top1": val["top1"], "val_top5": val["top5"], "lr": lr,
                  "images_per_sec": seen / max(sums["seconds"], 1e-9), "seconds": sums["seconds"]}
        if epoch + 1 == cfg.train.epochs and ten_crop:
            tc = evaluate(net, val_batches(True), layout, ten_crop=True)
            record.update(val_tencrop_top1=tc["top1"], val_tencrop_top5=tc["top5"])
        if layout.is_main:  # before the checkpoint: a resume from an older one truncates the record away
            rundir.append_metrics(run_path, record)
            rundir.plot(run_path)
        save_checkpoint(epoch + 1, 0, None)
        say(f"epoch {epoch + 1}: train loss {record['train_loss']:.3f} top-1 {record['train_top1']:.3f} | "
            f"val loss {val['loss']:.3f} top-1 {val['top1']:.3f} top-5 {val['top5']:.3f} | lr {lr:g} | "
            f"{record['images_per_sec']:.0f} img/s")
        if stop:
            break

    if preempted:
        say(f"stopped after step {step} on a stop signal (SIGTERM or SIGINT), checkpoint written; "
            f"continue with run.resume={run_path}")
    records = rundir.read_metrics(run_path) if layout.is_main else []
    summary = {"run_dir": str(run_path), "epochs": len(records), "steps": step, "skipped_steps": skipped}
    if records:
        last = records[-1]
        summary.update({k: v for k, v in last.items() if k.startswith("val_")},
                       best_val_top1=max(r["val_top1"] for r in records),
                       seconds=sum(r["seconds"] for r in records),
                       images_per_sec=last["images_per_sec"])
    if layout.is_main:
        say(rundir.write_summary(run_path, summary))
    return summary


def main(argv=None) -> int:
    try:
        cfg = load_config(argv)
        layout = setup(cfg.dist)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        with resilience.catch_stop_signals():  # SIGTERM/SIGINT: finish the step, checkpoint, stop
            with profiling(cfg, layout) as prof:  # profile.enabled: profile.json and a table at the end
                train(cfg, layout, prof)
    except (*USER_ERRORS, RunFailed, NonFiniteError) as e:
        print(f"error (rank {layout.rank}): {e}", file=sys.stderr)
        dump = resilience.dump_flight_recorder(layout.rank) if isinstance(e, PeerError) else None
        if dump:
            print(f"rank {layout.rank}: flight recorder written to {dump}; read it with torchfrtrace {dump.parent}",
                  file=sys.stderr)
        return 1
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
