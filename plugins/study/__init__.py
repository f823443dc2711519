"""``qcore study``: a grid of models x methods x schemes x backends run as cached,
resumable cells, summarised as a table, plots and the study's findings."""

from qcore_study.defaults import default_grid, quick_grid
from qcore_study.grid import Cell, EvaluatorEntry, MethodEntry, ModelEntry, StudyGrid, check_grid
from qcore_study.runner import StudyResult, run_study

__all__ = ["Cell", "EvaluatorEntry", "MethodEntry", "ModelEntry", "StudyGrid", "StudyResult",
           "check_grid", "default_grid", "quick_grid", "run_study"]
