"""Hyperparameter search with Ray Tune over the real pretraining function (``sweep.py``)."""
