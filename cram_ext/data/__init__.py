"""Synthetic tasks, generated on the fly and seeded (definitions in docs/tasks.md)."""

from .common import IGNORE
from .mqar import MQARBatch, mqar, recurring_table
from .srcd import SRCDBatch, srcd, srcd_input_dim, srcd_observation_input, srcd_recurring_table

__all__ = [
    "IGNORE",
    "MQARBatch",
    "mqar",
    "recurring_table",
    "SRCDBatch",
    "srcd",
    "srcd_input_dim",
    "srcd_observation_input",
    "srcd_recurring_table",
]
