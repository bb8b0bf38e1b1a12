"""Device matters that need no GPU: a checkpoint resumed in another memory format, which GPU a
process takes, and launches that would split a pair across nodes."""
import pytest
import torch
import torch.distributed as dist

from alexnet_mp.config import build_config
from alexnet_mp.distributed import choose_device, setup
from alexnet_mp.gpucheck.compare import compare
from alexnet_mp.gpucheck.configs import SMALL
from alexnet_mp.gpucheck.runs import run_spec, runs_worker
from alexnet_mp.parallel_dims import LaunchError, ParallelDims
from harness import run_ranks

BASE = [*SMALL, "dist.device=cpu", "dist.threads=1", "dist.mp=1", "train.batch_size=8", "data.train_size=64",
        "train.epochs=2", "train.lr=0.02"]
LAYOUTS = {"nhwc": "dist.channels_last=true", "nchw": "dist.channels_last=false"}


@pytest.fixture(scope="module")
def format_runs(tmp_path_factory):
    """For each memory format: 6 straight steps, 3 steps, and those 3 resumed to 6 in the other format."""
    runs = []
    for name, key in LAYOUTS.items():
        other = next(k for n, k in LAYOUTS.items() if n != name)
        runs += [run_spec(f"{name}-straight", key, "train.max_steps=6"),
                 run_spec(f"{name}-half", key, "train.max_steps=3"),
                 run_spec(f"{name}-resumed-in-other", other, "train.max_steps=6", resume=f"{name}-half")]
    return run_ranks(runs_worker, 1, args=(BASE, runs, str(tmp_path_factory.mktemp("formats"))), timeout=300)[0]


@pytest.mark.parametrize("written,resumed", [("nhwc", "nchw"), ("nchw", "nhwc")])
def test_a_checkpoint_resumes_in_the_other_memory_format_and_trains_on(format_runs, written, resumed):
    run = format_runs[f"{written}-resumed-in-other"]
    for when in ("start", "end"):  # after loading the checkpoint, and after training on
        assert run[when]["buffers"] == 16 and run[when]["param_strides"] and run[when]["on_param_device"], when
    assert run["steps"] == 6
    assert all(torch.isfinite(w).all() for w in run["weights"].values())
    moved = compare(run["weights"], format_runs[f"{written}-half"]["weights"])
    assert moved["max_rel_diff"] > 1e-3  # the resumed run trained
    # ... as a straight run in the resuming format does, to rounding (the kernels differ by format).
    same = compare(run["weights"], format_runs[f"{resumed}-straight"]["weights"])
    assert same["max_rel_diff"] < 1e-4, same


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this process sees `n` GPUs (torch's own query functions, not the project's)."""
    def see(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return see


def dist_cfg(device: str, *extra: str):
    return build_config(overrides=[f"dist.device={device}", *extra]).dist


@pytest.mark.parametrize("local_rank", [0, 1, 3])
def test_a_process_that_sees_one_gpu_uses_it_whatever_its_local_rank(gpus, local_rank):
    gpus(1)
    assert choose_device(dist_cfg("cuda"), local_rank) == torch.device("cuda", 0)
    assert choose_device(dist_cfg("auto"), local_rank) == torch.device("cuda", 0)


def test_each_local_rank_takes_its_own_gpu_and_extra_processes_are_refused(gpus):
    gpus(4)
    assert [choose_device(dist_cfg("cuda"), r) for r in range(4)] == [torch.device("cuda", r) for r in range(4)]
    gpus(2)
    with pytest.raises(LaunchError, match="local rank 2 has no GPU") as e:
        choose_device(dist_cfg("cuda"), 2)
    assert "--nproc_per_node" in str(e.value) and "\n" not in str(e.value)


def test_cpu_is_used_when_asked_or_when_there_is_no_gpu(gpus):
    gpus(2)
    assert choose_device(dist_cfg("cpu"), 1) == torch.device("cpu")
    gpus(0)
    assert choose_device(dist_cfg("auto"), 1) == torch.device("cpu")
    with pytest.raises(LaunchError, match="dist.device=cpu"):
        choose_device(dist_cfg("cuda"), 0)


def test_a_pair_split_across_nodes_is_refused_before_anything_starts(monkeypatch):
    # Two processes, one per node: each pair's columns would talk over the network.
    for key, value in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(LaunchError, match="straddle two nodes") as e:
        setup(dist_cfg("cpu", "dist.mp=2"))
    assert "even number of processes per node" in str(e.value)
    assert not dist.is_initialized()
    # Pairs whole on each node pass; the whole network per process (dist.mp=1) has no pair to split.
    assert ParallelDims(4, 2, local_world_size=2).dp == 2
    assert ParallelDims(2, 1, local_world_size=1).dp == 2
