"""LLM data-and-training pipeline on Ray.

Library code lives here; thin entry points live in ``jobs/``. Every stage is plain Python at its
core and handed to Ray by a small wrapper module (see ``pipeline/data/ray_ops.py``).
"""

__version__ = "0.1.0"
