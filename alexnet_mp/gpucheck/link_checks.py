"""The pair's real link (`PeerLink` over NCCL) on one GPU, checked against the in-process copy.

* values: one forward and backward of column 0 over the real link and over `LoopbackLink`, in fp32
  and bf16, NCHW and NHWC, with and without the overlapped crossings: the logits and every gradient
  must agree (bit for bit with deterministic kernels);
* host: with the device busy, an exchange must return to the host at once (the stream waits, not
  the process);
* step: `Trainer.train_step` over the real link under ``torch.cuda.set_sync_debug_mode("error")``
  (any host synchronisation inside the step raises) trains the weights the copy trains.

The workers run on CPUs too (a mirrored pair on gloo, see loop.py), which is how the tests run them.
"""
from __future__ import annotations

import time

import torch

from ..data import build_data
from ..distributed import configure_backends, setup
from ..trainer import Trainer
from ..weights import build_column, dropout_generator
from .compare import compare, cpu_state, describe, within
from .configs import config, fixed_batch, one_pass
from .loop import LoopbackLink, check_symmetric, column_zero_layout
from .report import verdict
from .steps import Losses, device_batches, guarded_steps

# dist.amp and dist.channels_last of each variant, and how close bf16's rounding lets two runs be.
VARIANTS = {"fp32 NCHW": ("off", False), "fp32 NHWC": ("off", True),
            "bf16 NCHW": ("bf16", False), "bf16 NHWC": ("bf16", True)}
TOLERANCE = {"off": 1e-5, "bf16": 1e-2}
STEP_TOLERANCE = 1e-3  # weights after a few steps, kernels free to differ in their summation order
SLEEP_CYCLES = 500_000_000  # device clock cycles the probe keeps the GPU busy (a quarter second at 2 GHz)
PROBE_S = 30.0  # seconds a first small exchange may take before the check calls NCCL's self-loop hung


def loop_layout(overrides: list):
    """(config, a layout whose column is its own peer): joins the process group of torchrun's
    environment, one rank (two for the mirrored pair); on a GPU one small exchange must come back first."""
    cfg = config(*overrides, "dist.mp=1")
    check_symmetric(cfg)
    layout = column_zero_layout(setup(cfg.dist))
    if layout.device.type == "cuda":
        probe_self_loop(layout)
    return cfg, layout


def probe_self_loop(layout, seconds: float = PROBE_S) -> None:
    """One small exchange through the real link, awaited with a deadline: a self-loop NCCL does not
    complete fails here in one line, instead of hanging the check until its budget runs out."""
    x = torch.arange(1024, dtype=torch.float32, device=layout.device)
    got = layout.link(seconds).exchange(x, x.shape, x, "probe", "forward")
    done = torch.cuda.Event()
    done.record()
    deadline = time.monotonic() + seconds
    while not done.query():
        if time.monotonic() > deadline:
            raise RuntimeError(f"NCCL did not complete a send from this rank to itself within {seconds:.0f} s")
        time.sleep(0.01)
    if not torch.equal(got, x):
        raise RuntimeError("NCCL's send from this rank to itself delivered other bytes than were sent")


def link_values_worker(rank: int, overrides: list) -> dict:
    return link_values(*loop_layout(overrides))


def link_values(cfg, layout) -> dict:
    """Column 0 over the real link and over the loopback, every variant: their comparison."""
    configure_backends(deterministic=True, tf32=False)
    torch.use_deterministic_algorithms(True, warn_only=True)  # the values are the question here, not the kernels
    images, labels = fixed_batch(cfg, layout.device)
    out = {}
    for name, (amp, channels_last) in VARIANTS.items():
        for overlap in (False, True):
            passes = []
            for link in (layout.link(cfg.dist.timeout_s), LoopbackLink(0, cfg.dist.timeout_s)):
                model = build_column(cfg.model, 0, link, cfg.train.seed, layout.device, overlap=overlap, amp=amp,
                                     channels_last=channels_last)  # a fresh link: channels_last sets its wire layout
                model.set_dropout_generator(dropout_generator(cfg.train.seed, layout.device))
                passes.append(one_pass(model, images, labels))
            result = compare(*passes)
            out[f"{name}{', overlapped' if overlap else ''}"] = dict(result, tolerance=TOLERANCE[amp])
    return out


def link_values_verdict(variants: dict) -> dict:
    bad = {k: v for k, v in variants.items() if not within(v, v["tolerance"])}
    exact = sum(v["identical"] for v in variants.values())
    figures = {k: {"identical": v["identical"], "max_rel_diff": v["max_rel_diff"]} for k, v in variants.items()}
    if bad:
        name, worst = next(iter(bad.items()))
        return verdict(False, f"{len(bad)} of {len(variants)} variants differ from the in-process copy; {name}: "
                              f"{describe(worst)} (tolerance {worst['tolerance']:g})", variants=figures)
    how = "bit for bit" if exact == len(variants) else f"{exact} bit for bit, the rest within their rounding tolerance"
    return verdict(True, f"the real link equals the in-process copy in all {len(variants)} variants (fp32/bf16, "
                         f"NCHW/NHWC, overlap off/on): {how}", variants=figures)


def host_async_worker(rank: int, overrides: list) -> dict:
    """One exchange posted and waited on while the GPU sleeps: how long the host was held."""
    cfg, layout = loop_layout(overrides)
    if layout.device.type != "cuda":
        raise RuntimeError("the host-wait probe needs a GPU: on a CPU every exchange holds the host by design")
    link = layout.link(cfg.dist.timeout_s)
    x = torch.randn(4 << 20, device=layout.device)  # 16 MB, about a paper-size conv3 crossing
    link.exchange(x, x.shape, x, "probe", "forward")  # warm: the communicator and its streams exist
    torch.cuda.synchronize()
    busy_from = torch.cuda.Event(enable_timing=True)
    busy_from.record()
    torch.cuda._sleep(SLEEP_CYCLES)
    start = time.perf_counter()
    got = link.exchange(x, x.shape, x, "probe", "forward")
    host_s = time.perf_counter() - start
    after = torch.cuda.Event(enable_timing=True)
    after.record()
    still_busy = not after.query()
    torch.cuda.synchronize()
    return {"host_s": host_s, "device_s": busy_from.elapsed_time(after) / 1e3, "still_busy": still_busy,
            "delivered": bool(torch.equal(got, x))}


def host_async_verdict(r: dict) -> dict:
    ok = r["still_busy"] and r["delivered"] and r["host_s"] < r["device_s"] / 2
    how = "returned" if r["still_busy"] else "was held until the device finished"
    return verdict(ok, f"an exchange queued behind {r['device_s'] * 1e3:.0f} ms of device work {how}: host "
                       f"{r['host_s'] * 1e3:.2f} ms; data {'delivered' if r['delivered'] else 'WRONG'}", **r)


def step_worker(rank: int, overrides: list, variants: dict, steps: int, watch_from: int) -> dict:
    _, layout = loop_layout(overrides)  # one process group for every variant
    return steps_against_copy(layout, overrides, variants, steps, watch_from)


def steps_against_copy(layout, overrides: list, variants: dict, steps: int, watch_from: int) -> dict:
    """For each variant (config overrides): the training step over the real link, watched for host
    syncs from step `watch_from` on, and over the loopback; {variant: {"wire": ..., "copy": ...}}."""
    out = {}
    for name, extra in variants.items():
        cfg = config(*overrides, *extra, "dist.mp=1")
        check_symmetric(cfg)
        bundle = build_data(cfg)
        out[name] = {}
        for kind in ("wire", "copy"):
            link = layout.link(cfg.dist.startup_timeout_s) if kind == "wire" else LoopbackLink(0)
            losses = Losses()
            trainer = Trainer(cfg, layout, callbacks=[losses], link=link)
            trainer.attach_data(bundle)
            try:
                watched = guarded_steps(trainer, device_batches(trainer, steps), watch_from)
                out[name][kind] = {"weights": cpu_state(trainer.model), "losses": losses.values, "watched": watched}
            finally:
                trainer.close()
    return out


def step_verdict(variants: dict) -> dict:
    lines, ok, figures = [], True, {}
    for name, r in variants.items():
        wire, copy = r["wire"], r["copy"]
        same = compare(wire["weights"], copy["weights"])
        finite = all(v == v for v in wire["losses"] + copy["losses"])  # NaN is not equal to itself
        good = finite and within(same, STEP_TOLERANCE) and len(wire["losses"]) == len(copy["losses"]) > 0
        ok = ok and good
        lines.append(f"{name}: {len(wire['losses'])} steps, {wire['watched']} watched, weights equal the copy's "
                     f"{describe(same)}{'' if finite else ', NON-FINITE LOSS'}")
        figures[name] = {"losses": wire["losses"], "max_rel_diff": same["max_rel_diff"], "watched": wire["watched"]}
    return verdict(ok, f"Trainer.train_step over the real link, watched steps under sync-debug mode 'error' "
                       f"(no host sync): {'; '.join(lines)}", **figures)
