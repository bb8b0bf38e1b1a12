"""Each step's bytes, per exchange and for the data-parallel all-reduce, compared with the analytic counts."""
from __future__ import annotations

from collections import Counter

from ..summary import analytic_bytes, column_params, param_count

EXAMPLES = 10  # mismatches kept in full; every one is counted


def allreduce_analytic_bytes(model_cfg, column: int, whole_network: bool) -> int:
    """What DDP all-reduces per step: every gradient once, in fp32 (the parameters' dtype, also under
    bf16 autocast); one column's parameters, or the whole network's when each process holds it (mp=1)."""
    return 4 * (param_count(model_cfg) if whole_network else column_params(model_cfg, column))


def link_bytes(link) -> dict[str, tuple[int, int]]:
    """(sent, received) so far per exchange key of a PeerLink; none without a link."""
    return {} if link is None else {k: (v["sent"], v["recv"]) for k, v in link.stats.bytes.items()}


def bytes_moved(now: dict, before: dict) -> dict[str, list[int]]:
    """[sent, received] per key between two `link_bytes` readings, for the keys that moved any."""
    moved = {}
    for key, (sent, recv) in now.items():
        sent0, recv0 = before.get(key, (0, 0))
        if sent - sent0 or recv - recv0:
            moved[key] = [sent - sent0, recv - recv0]
    return moved


class ByteCheck:
    """Compares every exchange key a step moved (and every key expected) with `summary.analytic_bytes`,
    and the all-reduce's bytes with `allreduce_bytes`. `crossings` is False when there is no link."""

    def __init__(self, cfg, column: int, crossings: bool, allreduce_bytes: int | None):
        self.cfg, self.column, self.crossings, self.allreduce_bytes = cfg, column, crossings, allreduce_bytes
        # Everything crosses in the autocast dtype under dist.amp=bf16 (every layer and the LRN keep bf16).
        self.element_size = 2 if cfg.dist.amp == "bf16" else 4
        self.counts, self.examples, self.steps = Counter(), [], 0
        self._analytic = {}

    def analytic(self, batch: int) -> dict[str, dict]:
        """The analytic bytes per exchange key for a batch of `batch` images (cached per batch)."""
        if not self.crossings:
            return {}
        if batch not in self._analytic:
            self._analytic[batch] = analytic_bytes(self.cfg.model, batch, self.column, self.element_size)
        return self._analytic[batch]

    def check(self, step: int, batch: int, moved: dict, reduced: int | None) -> None:
        """One step: `moved` from `bytes_moved`, `reduced` the all-reduce's bytes (None without DDP)."""
        self.steps += 1
        expected = self.analytic(batch)
        for key in sorted(set(moved) | set(expected)):
            want = [expected[key]["sent"], expected[key]["recv"]] if key in expected else [0, 0]
            got = moved.get(key, [0, 0])
            if got != want:
                self._mismatch(step, key, got, want)
        if reduced is not None and self.allreduce_bytes is not None and reduced != self.allreduce_bytes:
            self._mismatch(step, "dp.allreduce", [reduced], [self.allreduce_bytes])

    def _mismatch(self, step: int, key: str, measured: list, analytic: list) -> None:
        self.counts[key] += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append({"step": step, "key": key, "measured": measured, "analytic": analytic})

    def as_dict(self) -> dict:
        """The fields a rank's gathered record carries."""
        return {"bytes_checked": self.steps, "byte_mismatches": list(self.examples),
                "mismatch_counts": dict(self.counts)}
