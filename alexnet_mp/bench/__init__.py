"""make bench: the model-parallel pair against every other way to train the same network here.

    python -m alexnet_mp.bench --quick   # a 2-core CPU, about 10-15 minutes (what `make bench` runs)
    python -m alexnet_mp.bench --gpu     # GPUs: the paper's network in bf16, CUDA events
    python -m alexnet_mp.bench --tiny    # a toy run for the tests, the numbers mean nothing

Modes (modes.py) run in long-lived worker pools and are interleaved in every repeat; every
headline figure is the median of per-repeat paired ratios with a bootstrap 95% interval
(stats.py), and repeats go on until those intervals are narrow or a time cap is reached
(runner.py). FLOPs are counted on the actual step and compared with peaks measured in the
same repeat (flops.py); a calibration rate before and after says whether the machine's
speed held (calibrate.py). The loader section (loader.py) measures the data path. Results:
benchmarks/results/<machine>-<date>.json and .md (report.py); docs/benchmarks.md explains
every figure. `gpu_images_per_s` (gpu.py) measures one GPU for other modules.
"""
from .gpu import gpu_images_per_s

__all__ = ["gpu_images_per_s"]
