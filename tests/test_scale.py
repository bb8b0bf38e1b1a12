"""Data parallel x model parallel: 4 gloo processes = 2 replicas x 2 columns."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from alexnet_mp.config import build_config
from alexnet_mp.distributed import setup
from alexnet_mp.parallel_dims import LaunchError, ParallelDims
from alexnet_mp.profiler import AllReduceMeter, HostClock
from alexnet_mp.trainer.optim import param_groups
from alexnet_mp.weights import build_column, build_reference, dropout_generator, merge_states
from harness import run_ranks
from test_parity import GRAD_TOL, WEIGHT_TOL, small_cfg
from test_train import TINY, final_weights, script_worker

GLOBAL_BATCH, STEPS = 8, 3


def global_batch(cfg, step):
    g = torch.Generator().manual_seed(500 + step)
    images = torch.randn(GLOBAL_BATCH, 3, cfg.model.crop_size, cfg.model.crop_size, generator=g)
    return images, torch.randint(0, cfg.model.num_classes, (GLOBAL_BATCH,), generator=g)


def dp_steps(model, cfg, replica=0, replicas=1):
    """STEPS SGD steps on the global batches; each replica takes its own rows."""
    model.set_dropout_generator(dropout_generator(cfg.train.seed, "cpu"), replica, replicas)
    opt = torch.optim.SGD(param_groups(getattr(model, "module", model), cfg.train.weight_decay),
                          lr=cfg.train.lr, momentum=cfg.train.momentum)
    rows = GLOBAL_BATCH // replicas
    grads = None
    for step in range(STEPS):
        images, labels = global_batch(cfg, step)
        loss = F.cross_entropy(model(images[replica * rows:(replica + 1) * rows]),
                               labels[replica * rows:(replica + 1) * rows])
        opt.zero_grad()
        loss.backward()
        if step == 0:
            grads = {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return grads, {k: v.clone() for k, v in getattr(model, "module", model).state_dict().items()}


def dp_worker(rank):
    cfg = small_cfg()
    layout = setup(cfg.dist)
    out = {"column": layout.column, "replica": layout.dp_rank}
    for metered in (False, True):  # the profiler's all-reduce hook must not change a bit
        column = build_column(cfg.model, layout.column, layout.link(60), cfg.train.seed)
        net = DistributedDataParallel(column, process_group=layout.dp_group)
        meter = AllReduceMeter(net, layout.dp_group, HostClock()) if metered else None
        net.set_dropout_generator = column.set_dropout_generator
        grads, weights = dp_steps(net, cfg, layout.dp_rank, layout.dims.dp)
        if metered:
            out.update(metered_weights=weights, buckets=meter.take(),
                       grad_bytes=sum(p.numel() * p.element_size() for p in column.parameters()))
        else:
            out.update(grads=grads, weights=weights)
    return out


def test_dp_x_mp_step_equals_reference_step_on_the_global_batch():
    results = run_ranks(dp_worker, world_size=4, timeout=180)
    cfg = small_cfg()
    ref_grads, ref_weights = dp_steps(build_reference(cfg.model, cfg.train.seed), cfg)
    by_replica = {r: [None, None] for r in (0, 1)}
    for res in results.values():
        by_replica[res["replica"]][res["column"]] = res
    for replica, (c0, c1) in by_replica.items():
        grads = merge_states([c0["grads"], c1["grads"]], cfg.model)
        for name, g in ref_grads.items():  # the first step's averaged gradients
            torch.testing.assert_close(grads[name], g, **GRAD_TOL, msg=lambda m: f"{name}: {m}")
        weights = merge_states([c0["weights"], c1["weights"]], cfg.model)
        for name, w in ref_weights.items():
            torch.testing.assert_close(weights[name], w, **WEIGHT_TOL, msg=lambda m: f"{name}: {m}")
    for column in (0, 1):  # replicas stay identical, bit for bit
        a, b = by_replica[0][column]["weights"], by_replica[1][column]["weights"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    for res in results.values():
        assert all(torch.equal(res["metered_weights"][k], w) for k, w in res["weights"].items())
        # Every gradient byte of the column went through the meter once per step, and every bucket finished.
        assert sum(nbytes for _, _, nbytes in res["buckets"]) == STEPS * res["grad_bytes"]
        assert all(ready >= launch for launch, ready, _ in res["buckets"])


def run_world(tmp_path, world_size, *extra, name):
    argv = [*TINY, "data.train_size=96", f"run.out_dir={tmp_path}", f"run.name={name}", *extra]
    codes = run_ranks(script_worker, world_size=world_size, args=(argv,), timeout=240)
    assert set(codes.values()) == {0}
    return tmp_path / name


def test_checkpoint_from_4_processes_resumes_with_4_and_with_2(tmp_path, capfd):
    # 96 images, global batch 16: 6 steps per epoch; stop after 4 steps of epoch 2 (step 10).
    straight = final_weights(run_world(tmp_path, 4, name="straight"))
    run_world(tmp_path, 4, "train.max_steps=10", name="cut")
    cut = tmp_path / "cut"
    import shutil
    shutil.copytree(cut, tmp_path / "cut2")
    run_world(tmp_path, 4, f"run.resume={cut}", "train.max_steps=0", name="unused")
    resumed = final_weights(cut)
    for c in (0, 1):
        assert all(torch.equal(resumed[c][k], straight[c][k]) for k in straight[c]), f"column {c}"
    # The interrupted epoch's training figures add up both replicas' shares from before the cut too.
    straight_epoch, cut_epoch = (read_records(tmp_path / name)[-1] for name in ("straight", "cut"))
    assert cut_epoch["train_top1"] == straight_epoch["train_top1"]
    assert cut_epoch["train_loss"] == pytest.approx(straight_epoch["train_loss"], rel=1e-9)
    # With 2 processes the global batch halves: 64 images of epoch 2 were done, 4 steps of 8 follow.
    at_cut = final_weights(tmp_path / "cut2")
    capfd.readouterr()
    run_world(tmp_path, 2, f"run.resume={tmp_path / 'cut2'}", "train.max_steps=0", name="unused2")
    assert f"resumed from {tmp_path / 'cut2' / 'checkpoints' / 'step-000000010'}" in capfd.readouterr().out
    records = read_records(tmp_path / "cut2")
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["step"] == 10 + 4
    after = final_weights(tmp_path / "cut2")
    for c in (0, 1):  # the 4 steps trained the step-10 weights on
        assert all(torch.isfinite(w).all() for w in after[c].values())
        assert not all(torch.equal(after[c][k], at_cut[c][k]) for k in at_cut[c]), f"column {c}"


def read_records(run_path):
    return [json.loads(x) for x in (run_path / "metrics.jsonl").read_text().splitlines()]


def test_odd_world_size_and_wrong_replica_count_are_refused():
    with pytest.raises(LaunchError, match="must be even"):
        ParallelDims(3)
    with pytest.raises(LaunchError, match="must be even"):
        ParallelDims(1)
    assert ParallelDims(8).dp == 4 and ParallelDims(8).peer(5) == 4
    # One process per model replica (dist.mp=1): any number of processes, no peer.
    assert ParallelDims(3, mp=1).dp == 3 and ParallelDims(3, mp=1).peer(2) is None
    with pytest.raises(LaunchError, match="dist.mp must be 2"):
        ParallelDims(4, mp=4)
    # A pair never straddles two nodes: an odd number of processes per node (one included) is refused.
    for local in (1, 3):
        with pytest.raises(LaunchError, match="straddle two nodes"):
            ParallelDims(6, local_world_size=local)


def test_mesh_that_does_not_divide_fails_at_start(monkeypatch):
    for key, value in {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(LaunchError, match="dist.dp=3 replicas x 2 processes needs 6 processes"):
        setup(build_config(overrides=["dist.device=cpu", "dist.dp=3"]).dist)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(LaunchError, match="would straddle two nodes"):
        setup(build_config(overrides=["dist.device=cpu"]).dist)
