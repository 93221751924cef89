"""Analysis of a finished run: query helpers, decoded examples, plots and an HTML report."""

from pipeline.analysis.query import peak_steps, step_mass, top_influences, trajectory
from pipeline.analysis.results import RunNotFoundError, RunResults, open_results
from pipeline.analysis.sketches import checkpoint_scores, self_influence

__all__ = [
    "RunNotFoundError",
    "RunResults",
    "checkpoint_scores",
    "open_results",
    "peak_steps",
    "self_influence",
    "step_mass",
    "top_influences",
    "trajectory",
]
