"""The GPU check's results: one ``CHECK name: STATUS detail`` line per check, and a JSON file that
records every result and figure with the machine, its GPUs and the software versions."""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..files import write_text_atomic
from ..profiler.machine import machine_info

FORMAT = 1  # the JSON's layout
STATUSES = ("PASS", "FAIL", "INFO")


@dataclass
class CheckResult:
    """One check's outcome: PASS, FAIL, or INFO (a figure, or a check this machine cannot run)."""

    name: str
    status: str
    detail: str
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"check status {self.status!r} is not one of {', '.join(STATUSES)}")
        self.detail = " ".join(str(self.detail).split())  # always one line

    def line(self) -> str:
        return f"CHECK {self.name}: {self.status} {self.detail}"


def outcome(status: str, detail: str, **figures) -> dict:
    """What a check returns: plain data, so it crosses from the check's own process."""
    return {"status": status, "detail": detail, "figures": figures}


def verdict(ok: bool, detail: str, **figures) -> dict:
    """PASS when `ok`, else FAIL, with the same detail and figures."""
    return outcome("PASS" if ok else "FAIL", detail, **figures)


def nccl_version() -> str | None:
    try:
        v = torch.cuda.nccl.version()
    except Exception:  # a CPU-only build has no NCCL
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def software_versions() -> dict:
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "nccl": nccl_version() if torch.cuda.is_available() else None}


def driver_version() -> str | None:
    """The NVIDIA driver's version from NVML, or None without one."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()


def gpu_list() -> list[dict]:
    """Name, memory, compute capability and UUID of every visible GPU."""
    out = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "memory_bytes": p.total_memory,
                    "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
                    "uuid": str(getattr(p, "uuid", "")) or None})
    return out


def environment() -> dict:
    """The machine, its GPUs, the driver and the software the figures were measured with."""
    machine = machine_info(torch.device("cpu"))
    machine.pop("gpu", None)
    return {"machine": machine, "gpus": gpu_list(), "driver": driver_version(), "versions": software_versions()}


def build_report(results: list[CheckResult], env: dict, budget_s: float, elapsed_s: float, command: str) -> dict:
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    return {"format": FORMAT, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command, **env,
            "budget_s": budget_s, "elapsed_s": round(elapsed_s, 1), "counts": counts,
            "checks": [asdict(r) for r in results]}


def write_report(report: dict, path: str | Path) -> Path:
    """The JSON, written whole or not at all."""
    write_text_atomic(path, json.dumps(report, indent=1) + "\n", move="--out")
    return Path(path)


def exit_status(results: list[CheckResult]) -> int:
    """0 when no check failed, else 1."""
    return int(any(r.status == "FAIL" for r in results))
