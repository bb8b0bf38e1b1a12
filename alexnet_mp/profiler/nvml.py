"""GPU utilisation, memory, power and clocks from NVML, sampled in a background thread."""
from __future__ import annotations

import statistics
import threading

import torch


class NvmlSampler:
    """Utilisation, memory, power and clocks of one GPU, read every `interval_s` in a thread."""

    FIELDS = ("gpu_util_pct", "mem_util_pct", "mem_used_bytes", "power_w", "sm_clock_mhz", "mem_clock_mhz")

    def __init__(self, nvml, handle, interval_s: float):
        self.nvml, self.handle, self.interval_s = nvml, handle, interval_s
        self.samples = {f: [] for f in self.FIELDS}
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)

    def read(self) -> dict:
        nvml, h = self.nvml, self.handle
        util = nvml.nvmlDeviceGetUtilizationRates(h)
        return {"gpu_util_pct": util.gpu, "mem_util_pct": util.memory,
                "mem_used_bytes": nvml.nvmlDeviceGetMemoryInfo(h).used,
                "power_w": nvml.nvmlDeviceGetPowerUsage(h) / 1e3,  # NVML reports milliwatts
                "sm_clock_mhz": nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
                "mem_clock_mhz": nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM)}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for key, value in self.read().items():
                    self.samples[key].append(float(value))
            except Exception:  # a counter this GPU lacks must not end the run
                self.errors += 1
            self._stop.wait(self.interval_s)

    def start(self) -> "NvmlSampler":
        self._thread.start()
        return self

    def stop(self) -> dict:
        """End the sampling and shut NVML down; the mean and maximum of each reading."""
        self._stop.set()
        self._thread.join(timeout=5)
        out = {"available": True, "samples": len(self.samples["gpu_util_pct"]),
               "interval_s": self.interval_s, "read_errors": self.errors}
        for key, values in self.samples.items():
            out[key] = {"mean": statistics.fmean(values), "max": max(values)} if values else None
        try:
            self.nvml.nvmlShutdown()
        except Exception:
            pass
        return out


def open_nvml(device: torch.device, interval_s: float, nvml=None) -> tuple[NvmlSampler | None, str | None]:
    """A started sampler for `device`, or (None, why not). `nvml` replaces pynvml (tests)."""
    if device.type != "cuda":
        return None, f"this rank runs on the {device.type.upper()}, not on an NVIDIA GPU"
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"
    index = device.index or 0
    try:  # by UUID: NVML's indices ignore CUDA_VISIBLE_DEVICES
        handle = nvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(index).uuid}")
    except Exception:
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as e:
            return None, f"no NVML handle for cuda:{index}: {e}"
    return NvmlSampler(nvml, handle, interval_s).start(), None
