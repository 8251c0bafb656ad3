"""mixersnn: efficient spiking MLPs (Mixer-SNN, arXiv 2306.12465).

The model library never imports Ray or MLflow; trainers/ and search/ build on it.
"""

from __future__ import annotations

__version__ = "0.1.0"
