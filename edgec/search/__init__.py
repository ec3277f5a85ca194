"""``edgec optimize``: search compression and precision settings for the most accurate
artifact that meets a device budget (see :mod:`edgec.search.driver`)."""

from edgec.search.driver import Budgets, OptimizeOptions, OptimizeResult, optimize
from edgec.search.evaluate import Problem, evaluate

__all__ = ["Budgets", "OptimizeOptions", "OptimizeResult", "Problem", "evaluate", "optimize"]
