"""Analysis of a finished run: query helpers, decoded examples, plots and an HTML report.

The names below are imported on first use, so that `sdi --help` and `sdi run` do not
load matplotlib and the query code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RunNotFoundError": "pipeline.analysis.results",
    "RunResults": "pipeline.analysis.results",
    "open_results": "pipeline.analysis.results",
    "checkpoint_scores": "pipeline.analysis.sketches",
    "self_influence": "pipeline.analysis.sketches",
    "peak_steps": "pipeline.analysis.query",
    "step_mass": "pipeline.analysis.query",
    "top_influences": "pipeline.analysis.query",
    "trajectory": "pipeline.analysis.query",
    "write_report": "pipeline.analysis.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline.analysis' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
