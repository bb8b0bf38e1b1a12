"""How the profiler sees a GPU: its CUDA-event clock (`CudaClock`) and its NVML sampler (`open_nvml`,
which finds the GPU by UUID because NVML's indices ignore CUDA_VISIBLE_DEVICES)."""
from __future__ import annotations

import time

import torch

from ..profiler import CudaClock, open_nvml
from .link_checks import SLEEP_CYCLES
from .report import verdict

LOAD_S = 1.0  # seconds of matrix products while NVML samples


def clock_probe(rank: int = 0) -> dict:
    """A device sleep timed by CudaClock, against the host's view of the same interval."""
    clock = CudaClock()
    torch.zeros(1, device="cuda")  # the context exists before anything is timed
    torch.cuda.synchronize()
    start_host = time.perf_counter()
    start = clock.now()
    torch.cuda._sleep(SLEEP_CYCLES)
    end = clock.now()
    queued_s = time.perf_counter() - start_host
    clock.settle()
    host_s = time.perf_counter() - start_host
    return {"device_s": clock.seconds(start, end), "host_s": host_s, "queued_s": queued_s}


def clock_verdict(r: dict) -> dict:
    # The events bracket the sleep only: inside the host's interval, most of it, and marks never wait.
    ok = 0.5 * r["host_s"] < r["device_s"] <= r["host_s"] + 1e-3 and r["queued_s"] < 0.5 * r["device_s"]
    return verdict(ok, f"CUDA events timed a device sleep at {r['device_s'] * 1e3:.1f} ms (the host saw "
                       f"{r['host_s'] * 1e3:.1f} ms; taking the marks cost it {r['queued_s'] * 1e3:.2f} ms)", **r)


def _uuid(text) -> str:
    text = text.decode() if isinstance(text, bytes) else str(text)
    return text.lower().removeprefix("gpu-")


def nvml_probe(rank: int = 0) -> dict:
    """The profiler's NVML handle for this process's GPU: its UUID against torch's, and its samples
    during LOAD_S seconds of matrix products."""
    device = torch.device("cuda", torch.cuda.current_device())
    torch_uuid = str(torch.cuda.get_device_properties(device).uuid)
    sampler, why = open_nvml(device, interval_s=0.05)
    if sampler is None:
        return {"error": why, "torch_uuid": torch_uuid}
    nvml = sampler.nvml
    try:
        nvml_uuid = _uuid(nvml.nvmlDeviceGetUUID(sampler.handle))
        try:
            nvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch_uuid}")  # the lookup open_nvml makes first
            by_uuid = True
        except Exception:
            by_uuid = False
        a = torch.randn(4096, 4096, device=device)
        start = time.perf_counter()
        while time.perf_counter() - start < LOAD_S:
            a = torch.tanh(a @ a)
            torch.cuda.synchronize()
    finally:
        report = sampler.stop()
    return {"torch_uuid": torch_uuid, "nvml_uuid": nvml_uuid, "found_by_uuid": by_uuid, "sampler": report}


def nvml_verdict(r: dict) -> dict:
    if "error" in r:
        return verdict(False, f"NVML did not open for this GPU: {r['error']}", **r)
    s = r["sampler"]
    same = _uuid(r["torch_uuid"]) == r["nvml_uuid"]
    ok = same and r["found_by_uuid"] and s["samples"] > 0

    def peak(key):
        return f"{s[key]['max']:.0f}" if s.get(key) else "n/a"

    return verdict(ok, f"NVML's handle {'is' if same else 'is NOT'} torch's GPU (UUID {r['nvml_uuid']}, found by "
                       f"UUID: {r['found_by_uuid']}); {s['samples']} samples in {LOAD_S:g} s of matrix products: "
                       f"utilisation max {peak('gpu_util_pct')}%, power max {peak('power_w')} W, SM clock max "
                       f"{peak('sm_clock_mhz')} MHz ({s['read_errors']} read errors)", **r)
