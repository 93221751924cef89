"""Tensor-level building blocks: the looped model, its tasks, gradient capture and sketches.

Nothing in this package touches Ray or storage, so every piece can be tested on tensors alone.
"""

__version__ = "0.1.0"
