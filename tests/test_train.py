"""The training script end to end, on two gloo processes with a tiny config."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train as train_script  # launch/train.py (pytest's pythonpath)
from alexnet_mp import checkpoint
from alexnet_mp.config import build_config
from alexnet_mp.data import batch_checksum
from alexnet_mp.distributed import setup
from alexnet_mp.export import export, load_single_device
from alexnet_mp.model import AlexNetColumn
from alexnet_mp.rundir import RunLock
from alexnet_mp.trainer import Callback
from alexnet_mp.weights import build_column, build_reference, dropout_generator, split_state
from harness import SMALL_MODEL, free_port, run_ranks

ROOT = Path(__file__).resolve().parent.parent

TINY = [*SMALL_MODEL, "data.image_size=72", "data.resize=72", "data.train_size=64", "data.val_size=24",
        "data.num_workers=0", "train.batch_size=8", "train.epochs=2", "train.lr=0.02",
        "dist.device=cpu", "dist.threads=1", "run.progress=false"]


def script_worker(rank, argv, callbacks=()):
    return train_script.main(argv, callbacks=callbacks)


def run_script(tmp_path, *extra, name="run", expect=0, callbacks=()):
    argv = [*TINY, f"run.out_dir={tmp_path}", f"run.name={name}", *extra]
    codes = run_ranks(script_worker, args=(argv, callbacks), timeout=180)
    assert codes == {0: expect, 1: expect}
    return tmp_path / name


def final_weights(run_path):
    folder, _ = checkpoint.latest_good(run_path / "checkpoints")
    return [checkpoint.load_column(folder, c)["model"] for c in (0, 1)]


def test_torchrun_trains_and_writes_the_run_directory(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "launch" / "train.py"), *TINY, "run.progress=true", "run.log_every=4",
           f"run.out_dir={tmp_path}", "run.name=r"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "r"
    assert (run / "config.yaml").is_file() and (run / "metrics.png").stat().st_size > 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        for key in ("epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr",
                    "images_per_sec", "seconds"):
            assert key in r, key
        assert 0 <= r["val_top1"] <= r["val_top5"] <= 1 and r["images_per_sec"] > 0
    assert "val_tencrop_top1" in records[-1]
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [4, 8, 12, 16]  # run.log_every=4, 8 steps per epoch
    for s in steps:
        assert set(s) == {"step", "epoch", "loss", "top1", "lr", "images_per_sec", "data_wait_share", "step_time_s"}
        assert s["loss"] > 0 and 0 <= s["top1"] <= 1 and 0 <= s["data_wait_share"] <= 1 and s["step_time_s"] > 0
    assert [s["epoch"] for s in steps] == [1, 1, 2, 2] and steps[0]["lr"] == 0.02
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and "summary:" in proc.stdout
    assert "epoch 2/2: 8/8 (100%)" in proc.stderr  # rank 0's progress, as log lines without a terminal
    assert len(checkpoint.committed(run / "checkpoints")) == 2  # keep_checkpoints


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    straight = final_weights(run_script(tmp_path, name="straight"))
    # 8 steps per epoch: stop mid-way through epoch 2, then continue.
    run_script(tmp_path, "train.max_steps=11", name="resumed")
    interrupted = final_weights(tmp_path / "resumed")
    run_script(tmp_path, f"run.resume={tmp_path / 'resumed'}", "train.max_steps=0", name="unused")
    resumed = final_weights(tmp_path / "resumed")
    assert any(not torch.equal(interrupted[0][k], resumed[0][k]) for k in resumed[0])
    for c in (0, 1):
        for key, value in straight[c].items():
            assert torch.equal(resumed[c][key], value), f"column {c} {key}"
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


class InputChecksums(Callback):
    """The checksum of every training input the model saw."""

    def __init__(self):
        self.sums = []

    def on_fit_start(self, trainer):
        trainer.model.register_forward_pre_hook(
            lambda m, args: self.sums.append(batch_checksum(args[0])) if m.training else None)


def checksum_worker(rank, argv):
    recorder = InputChecksums()
    assert train_script.main(argv, callbacks=[recorder]) == 0
    return recorder.sums


def test_both_columns_train_on_identical_batches_with_loader_workers(tmp_path):
    """Each column decodes half of every batch in its workers; after the swap both hold the same inputs."""
    argv = [*TINY, "data.num_workers=2", f"run.out_dir={tmp_path}", "run.name=w"]
    sums = run_ranks(checksum_worker, args=(argv,), timeout=180)
    assert sums[0] == sums[1] and len(set(sums[0])) == len(sums[0]) == 16


def test_export_gives_the_pairs_logits_and_round_trips(tmp_path):
    run = run_script(tmp_path, "train.epochs=1")
    out = tmp_path / "alexnet.pt"
    assert subprocess.run([sys.executable, "-m", "alexnet_mp.export", str(run), str(out)], cwd=ROOT).returncode == 0
    blob = torch.load(out, weights_only=True)
    cfg = build_config(overrides=TINY)
    state, meta = load_single_device(out, cfg.model)
    assert meta["num_classes"] == 5 and len(meta["classes"]) == 5 and meta["crop_size"] == 67
    assert meta["lrn"] == {"enabled": True, "size": 5, "alpha": 1e-4, "beta": 0.75, "k": 2.0}
    assert len(meta["mean"]) == 3 and meta["normalize"] == "meanstd"
    # The exported network reproduces the pair's logits.
    ref = build_reference(cfg.model, 0)
    ref.load_state_dict(blob["state_dict"])
    ref.eval()
    images = torch.randn(4, 3, 67, 67, generator=torch.Generator().manual_seed(0))
    pair_logits = run_ranks(logits_worker, args=(str(run), images), timeout=120)
    with torch.no_grad():
        torch.testing.assert_close(pair_logits[0], ref(images), rtol=1e-4, atol=1e-5)
    # A run can start from the file: evaluating it gives the trained run's figures.
    ev = run_script(tmp_path, "run.eval_only=true", f"run.init_from={out}", name="from-file")
    trained = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert json.loads((ev / "metrics.jsonl").read_text())["val_loss"] == pytest.approx(trained["val_loss"])
    # Split into columns, checkpointed, exported again: the file comes back bit for bit.
    run_ranks(split_and_save_worker, args=(str(out), str(tmp_path / "ckpt")), timeout=120)
    again = export(tmp_path / "ckpt" / "step-000000000", tmp_path / "again.pt")
    assert again["state_dict"].keys() == blob["state_dict"].keys()
    for key, value in blob["state_dict"].items():
        assert torch.equal(again["state_dict"][key], value), key
    assert again["meta"]["classes"] == blob["meta"]["classes"]


def split_and_save_worker(rank, file, root):
    cfg = build_config(overrides=TINY)
    layout = setup(cfg.dist)
    state, meta = load_single_device(file, cfg.model)
    model = AlexNetColumn(cfg.model, layout.column, None)
    model.load_state_dict(split_state(state, cfg.model, layout.column))
    manifest = {"config": cfg.to_dict(), "model_hash": cfg.model_hash(), "classes": meta["classes"],
                "mean": meta["mean"], "std": meta["std"]}
    checkpoint.save(Path(root), 0, layout.column, {"model": model.state_dict()}, manifest, 1, layout.mp_group)


def logits_worker(rank, run, images):
    cfg = build_config(overrides=TINY)
    layout = setup(cfg.dist)
    folder, _ = checkpoint.resolve(run)
    model = build_column(cfg.model, layout.column, layout.link(60), 0)
    model.load_state_dict(checkpoint.load_column(folder, layout.column)["model"])
    model.set_dropout_generator(dropout_generator(0, "cpu"))
    model.eval()
    with torch.no_grad():
        return model(images)


def test_eval_only_writes_the_same_metric_keys(tmp_path):
    run = run_script(tmp_path, "train.epochs=1")
    # As the README writes it, without a run.name: the evaluation gets a directory of its own.
    argv = [*TINY, f"run.out_dir={tmp_path}", "run.eval_only=true", f"run.resume={run}"]
    assert run_ranks(script_worker, args=(argv,), timeout=180) == {0: 0, 1: 0}
    (ev,) = tmp_path.glob("eval-*")
    record = json.loads((ev / "metrics.jsonl").read_text())
    trained = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(trained) - {"step"} <= set(record)
    for key in ("val_loss", "val_top1", "val_top5"):  # the checkpoint's weights, not fresh ones
        assert record[key] == pytest.approx(trained[key]), key
    assert 0 <= record["val_tencrop_top1"] <= 1


def folder_state(path: Path) -> dict:
    """Every file under `path` with its bytes."""
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_bad_inputs_stop_both_ranks_with_one_line_and_leave_the_disk_as_it_was(tmp_path, capfd):
    run = run_script(tmp_path, "train.epochs=1")
    before = folder_state(run)
    # The same run name again.
    run_script(tmp_path, "train.epochs=1", expect=1)
    assert "already holds a run" in capfd.readouterr().err
    # A checkpoint from another model: refused before anything in the run folder is touched.
    run_script(tmp_path, f"run.resume={run}", "model.fc_width=64", name="x", expect=1)
    assert "another model config" in capfd.readouterr().err
    assert folder_state(run) == before
    # A second writer while the run is live (the lock held here) is refused, naming the holder.
    with RunLock(run):
        run_script(tmp_path, f"run.resume={run}", name="x", expect=1)
    assert f"pid {os.getpid()}" in capfd.readouterr().err
    assert {k: v for k, v in folder_state(run).items() if k.name != "run.lock"} == \
        {k: v for k, v in before.items() if k.name != "run.lock"}
    # Starts that fail (a data folder that is not there, an init file that is not one) leave no folder,
    # so the same command works once the input is fixed.
    run_script(tmp_path, "data.dataset=folder", f"data.root={tmp_path / 'none'}", name="y", expect=1)
    assert str(tmp_path / "none") in capfd.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    run_script(tmp_path, f"run.init_from={tmp_path / 'junk.pt'}", name="y", expect=1)
    assert "junk.pt" in capfd.readouterr().err
    assert not (tmp_path / "y").exists()
    run_script(tmp_path, "train.max_steps=1", name="y")


def test_wrong_number_of_processes_is_refused(monkeypatch, capfd):
    for key, value in {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    assert train_script.main(TINY) == 2
    assert "number of processes must be even" in capfd.readouterr().err


def test_trains_on_an_image_folder_as_the_readme_says(tmp_path):
    """README: --config configs/small.yaml data.dataset=folder data.root=ROOT model.num_classes=N."""
    from PIL import Image
    rng = torch.Generator().manual_seed(0)
    colours = {"apple": (200, 30, 30), "leaf": (30, 180, 30), "sky": (40, 60, 220)}
    for split, count in (("train", 12), ("val", 4)):
        for name, colour in colours.items():
            (tmp_path / "imgs" / split / name).mkdir(parents=True)
            for i in range(count):
                noise = torch.randint(-40, 40, (90, 100, 3), generator=rng)
                pixels = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / "imgs" / split / name / f"{i}.jpg")
    argv = ["--config", str(ROOT / "configs" / "small.yaml"), "data.dataset=folder",
            f"data.root={tmp_path / 'imgs'}", "model.num_classes=3", "train.epochs=2", "train.batch_size=6",
            "data.num_workers=0", "dist.device=cpu", "run.progress=false", f"run.out_dir={tmp_path}", "run.name=f"]
    assert run_ranks(script_worker, args=(argv,), timeout=180) == {0: 0, 1: 0}
    records = [json.loads(x) for x in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[-1]["val_top1"] > 1 / 3  # three plain colours: above chance
    assert json.loads((tmp_path / "f" / "summary.json").read_text())["epochs"] == 2
    assert list((tmp_path / ".cache").glob("data-stats-*")), "the data statistics were not cached"


def test_tensorboard_event_files_carry_the_per_step_record(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = run_script(tmp_path, "train.epochs=1", "run.tensorboard=true", "run.log_every=2")
    (events,) = (run / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    steps = [json.loads(x) for x in (run / "steps.jsonl").read_text().splitlines()]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [s["step"] for s in steps] == [2, 4, 6, 8]
    assert [e.value for e in loss] == pytest.approx([s["loss"] for s in steps], rel=1e-6)
