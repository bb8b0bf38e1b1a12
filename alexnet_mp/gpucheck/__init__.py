"""The GPU check (``python -m alexnet_mp.gpu_check``, ``make gpu-check``): the GPU path checked on one
node in a few minutes, one ``CHECK name: PASS|FAIL|INFO detail`` line per check and a JSON report.

Modules: report (results, lines, the JSON, the machine), runner (each check in processes of its own
under a time budget), plan (the checks in order), configs (what they run), compare (tensor
comparisons), loop (a column that is its own peer), steps (the trainer's step outside fit),
link_checks (the real link against the in-process copy, host waits, sync-debug), numerics (GPU
against CPU), hardware (CUDA events, NVML), runs (whole training runs), resume_checks (checkpoints
on and across devices), timing (images per second), loader (loader throughput), pair_checks (two GPUs).
"""
