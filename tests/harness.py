"""Shared test settings; the spawner is the package's own (alexnet_mp.spawn)."""
from alexnet_mp.spawn import free_port, run_ranks  # noqa: F401  (re-exported for the tests)

SMALL_MODEL = [
    "model.num_classes=5", "model.crop_size=67", "model.conv_widths=[8,16,24,24,16]",
    "model.fc_width=32", "model.init=he", "model.dropout=0.5",
]
