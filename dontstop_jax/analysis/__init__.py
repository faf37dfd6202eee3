"""Scoring and reporting: classification metrics and the experiment grid's result table."""

from dontstop_jax.analysis.metrics import classification_metrics, confusion_matrix
from dontstop_jax.analysis.table import Cell, ResultsTable, Significance, results_table, significance
