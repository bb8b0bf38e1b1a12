"""Train the two-column AlexNet: one process per column.

    torchrun --nproc_per_node=2 launch/train.py [--config FILE] [key=value ...]

Without --config it trains the small network of configs/small.yaml on the
built-in data set. The script reads top to bottom: configuration, processes,
run directory, data, model, resume, the epoch loop, the end.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a plain checkout too

from alexnet_mp import checkpoint, rundir  # noqa: E402
from alexnet_mp.config import ConfigError, build_config, parse_overrides  # noqa: E402
from alexnet_mp.data import DataError, build_data, eval_loader, train_loader  # noqa: E402
from alexnet_mp.distributed import LaunchError, setup, teardown  # noqa: E402
from alexnet_mp.exchange import PeerError  # noqa: E402
from alexnet_mp.export import ExportError, load_single_device  # noqa: E402
from alexnet_mp.model import build_column, dropout_generator, param_groups, split_state  # noqa: E402
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
    resume = parse_overrides(args.overrides).get("run", {}).get("resume")
    if resume:  # continue with the run's own config; overrides still apply
        return build_config(args.config, args.overrides, base=rundir.load_run_config(resume))
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
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise RunFailed(box[1])
    return box[0]


def on_main_first(layout, fn):
    """fn() on rank 0, then on the others: for work that fills a shared cache."""
    kept = []
    decided_by_main(layout, lambda: kept.append(fn()))
    return kept[0] if layout.is_main else fn()


def all_finite(loss, model, device) -> bool:
    """Whether every rank's loss and gradients are finite; all ranks get the same answer."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    ok = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@torch.no_grad()
def evaluate(model, loader, device, ten_crop=False) -> dict:
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top-1, top-5, images
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if ten_crop:  # average the softmax over the ten views of each image
            probs = F.softmax(model(images.flatten(0, 1)), dim=1).view(images.shape[0], 10, -1).mean(1)
        else:
            probs = F.softmax(model(images), dim=1)
        top5 = probs.topk(min(5, probs.shape[1]), dim=1).indices
        sums += torch.tensor([F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum").item(),
                              (top5[:, 0] == labels).sum().item(),
                              (top5 == labels[:, None]).any(1).sum().item(), len(labels)], dtype=torch.float64)
    return {"loss": sums[0].item() / sums[3].item(), "top1": sums[1].item() / sums[3].item(),
            "top5": sums[2].item() / sums[3].item()}


def train(cfg, layout) -> dict:
    say = print if layout.is_main else (lambda *a, **k: None)
    device, column = layout.device, layout.column
    eval_only = cfg.run.eval_only
    resuming = bool(cfg.run.resume) and not eval_only

    # --- run directory: rank 0 names and creates it, everyone learns the path
    def make_run_dir():
        if resuming:
            return rundir.prepare(cfg, Path(cfg.run.resume), resuming=True)
        name = cfg.run.name or ("eval-" if eval_only else "") + rundir.default_name()
        return rundir.prepare(cfg, Path(cfg.run.out_dir) / name, resuming=False)
    run_path = decided_by_main(layout, make_run_dir)

    # --- data: identical on both columns; rank 0 first so it alone fills the cache
    data = on_main_first(layout, lambda: build_data(cfg, cache_dir=Path(cfg.run.out_dir) / ".cache"))
    say(f"data: {cfg.data.dataset}, {len(data.train)} training and {len(data.val)} validation images, "
        f"{len(data.classes)} classes" + (f", {data.skipped} unreadable images skipped" if data.skipped else ""))

    # --- model, optimiser, schedule
    link = layout.link(cfg.dist.startup_timeout_s)  # generous until the first step has run
    model = build_column(cfg.model, column, link, cfg.train.seed, device, overlap=cfg.dist.overlap,
                         amp=cfg.dist.amp, channels_last=cfg.dist.channels_last)
    dropout_rng = dropout_generator(cfg.train.seed, device)
    model.set_dropout_generator(dropout_rng)
    # fused: one pass over the weights per step, the same numbers as the default
    # loop and a quarter of its time on CPU (docs/bench.md).
    optimizer = torch.optim.SGD(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                momentum=cfg.train.momentum, fused=True)
    schedule = LRSchedule(cfg.train)
    start_epoch, start_batch, step, partial = 0, 0, 0, None

    # --- where to start: a checkpoint of this run, or a single-device file
    source = cfg.run.resume if cfg.run.resume else ""
    if source:
        folder, manifest = checkpoint.resolve(source)
        if manifest["model_hash"] != cfg.model_hash():
            raise checkpoint.CheckpointError(
                f"{folder} was written for another model config ({manifest['model_hash']} vs "
                f"{cfg.model_hash()}); resume with the run's own model.* settings")
        state = checkpoint.load_column(folder, column, device)
        model.load_state_dict(state["model"])
        if not eval_only:
            optimizer.load_state_dict(state["optimizer"])
            dropout_rng.set_state(state["dropout_rng"].cpu())
            trainer = manifest["trainer"]
            start_epoch, start_batch, step = trainer["epoch"], trainer["batch"], trainer["step"]
            schedule.load_state_dict(trainer["schedule"])
            partial = trainer.get("partial")
            if layout.is_main:
                rundir.truncate_metrics(run_path, start_epoch)
        say(f"resumed from {folder} (epoch {start_epoch + 1}, batch {start_batch}, step {step})")
    elif cfg.run.init_from:
        ref_state, _ = load_single_device(cfg.run.init_from, cfg.model)
        model.load_state_dict(split_state(ref_state, cfg.model, column))
        say(f"initialised from {cfg.run.init_from}")

    def save_checkpoint(epoch, batch, sums):
        if layout.dp_rank != 0:  # one copy of each column, from the first replica
            return
        manifest = {"config": cfg.to_dict(), "model_hash": cfg.model_hash(), "world_size": layout.dims.world_size,
                    "classes": data.classes, "mean": data.mean, "std": data.std,
                    "trainer": {"epoch": epoch, "batch": batch, "step": step, "schedule": schedule.state_dict(),
                                "partial": sums}}
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "dropout_rng": dropout_rng.get_state(), "column": column}
        checkpoint.save(run_path / "checkpoints", step, column, payload, manifest,
                        cfg.run.keep_checkpoints, layout.mp_group)

    ten_crop = cfg.data.ten_crop and data.val_ten_crop is not None
    if eval_only:
        centre = evaluate(model, eval_loader(data, cfg), device)
        record = {k: None for k in rundir.METRIC_KEYS}
        record.update(epoch=start_epoch, val_loss=centre["loss"], val_top1=centre["top1"], val_top5=centre["top5"])
        if ten_crop:
            tc = evaluate(model, eval_loader(data, cfg, ten_crop=True), device, ten_crop=True)
            record.update(val_tencrop_top1=tc["top1"], val_tencrop_top5=tc["top5"])
        if layout.is_main:
            rundir.append_metrics(run_path, record)
            say(rundir.write_summary(run_path, {"run_dir": str(run_path), **record}))
        return record

    # --- the epoch loop
    pair_batch = cfg.train.batch_size
    steps_per_epoch = len(data.train) // (pair_batch * layout.dims.dp)
    if steps_per_epoch == 0:
        raise DataError(f"the training set ({len(data.train)} images) is smaller than one global batch "
                        f"({pair_batch * layout.dims.dp}); lower train.batch_size")
    say(f"run directory: {run_path}; {steps_per_epoch} steps per epoch; "
        f"{layout.dims.dp} replica(s) x 2 columns on {device}")
    record, stop = {}, False
    for epoch in range(start_epoch, cfg.train.epochs):
        lr = schedule.lr(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        sums = partial or {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        partial = None
        bar = tqdm(total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   disable=not (layout.is_main and cfg.run.progress), mininterval=1.0, dynamic_ncols=True)
        tick = time.perf_counter()
        batches = train_loader(data, cfg, epoch, start_batch, layout.dp_rank, layout.dims.dp)
        for batch, (images, labels) in enumerate(batches, start=start_batch):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not all_finite(loss, model, device):
                where = f"step {step + 1} (epoch {epoch + 1}, batch {batch})"
                if cfg.run.nonfinite == "error":
                    raise NonFiniteError(f"non-finite loss or gradient at {where}; the weights were not updated "
                                         f"and the last checkpoint is intact; lower train.lr, or set "
                                         f"run.nonfinite=skip to skip such steps")
                say(f"warning: skipped {where}: non-finite loss or gradient")
                continue
            optimizer.step()
            step += 1
            if step == 1:
                link.timeout_s = cfg.dist.timeout_s  # start-up is over: fail fast from now on
            sums["loss"] += loss.item() * len(labels)
            sums["correct"] += int((logits.argmax(1) == labels).sum())
            sums["seen"] += len(labels)
            bar.update(1)
            if bar.n % 10 == 0 or bar.n == steps_per_epoch:
                elapsed = sums["seconds"] + time.perf_counter() - tick
                bar.set_postfix(loss=f"{sums['loss'] / sums['seen']:.3f}", acc=f"{sums['correct'] / sums['seen']:.3f}",
                                img_s=f"{sums['seen'] * layout.dims.dp / max(elapsed, 1e-9):.0f}")
            stop = cfg.train.max_steps and step >= cfg.train.max_steps
            if stop or (cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0):
                if batch + 1 < steps_per_epoch:  # at an epoch's end the epoch checkpoint follows
                    save_checkpoint(epoch, batch + 1, dict(sums, seconds=sums["seconds"] + time.perf_counter() - tick))
            if stop:
                break
        bar.close()
        if stop and batch + 1 < steps_per_epoch:
            say(f"stopped at step {step} (train.max_steps); continue with run.resume={run_path} train.max_steps=0")
            break
        sums["seconds"] += time.perf_counter() - tick
        start_batch = 0
        val = evaluate(model, eval_loader(data, cfg), device)
        schedule.observe(val["loss"])
        record = {"epoch": epoch + 1, "step": step, "train_loss": sums["loss"] / max(sums["seen"], 1),
                  "train_top1": sums["correct"] / max(sums["seen"], 1), "val_loss": val["loss"],
                  "val_top1": val["top1"], "val_top5": val["top5"], "lr": lr,
                  "images_per_sec": sums["seen"] * layout.dims.dp / max(sums["seconds"], 1e-9),
                  "seconds": sums["seconds"]}
        if epoch + 1 == cfg.train.epochs and ten_crop:
            tc = evaluate(model, eval_loader(data, cfg, ten_crop=True), device, ten_crop=True)
            record.update(val_tencrop_top1=tc["top1"], val_tencrop_top5=tc["top5"])
        save_checkpoint(epoch + 1, 0, None)
        if layout.is_main:
            rundir.append_metrics(run_path, record)
            rundir.plot(run_path)
        say(f"epoch {epoch + 1}: train loss {record['train_loss']:.3f} top-1 {record['train_top1']:.3f} | "
            f"val loss {val['loss']:.3f} top-1 {val['top1']:.3f} top-5 {val['top5']:.3f} | lr {lr:g} | "
            f"{record['images_per_sec']:.0f} img/s")
        if stop:
            break

    records = rundir.read_metrics(run_path) if layout.is_main else []
    summary = {"run_dir": str(run_path), "epochs": len(records), "steps": step}
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
        train(cfg, layout)
    except (*USER_ERRORS, RunFailed, NonFiniteError) as e:
        print(f"error (rank {layout.rank}): {e}", file=sys.stderr)
        return 1
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
