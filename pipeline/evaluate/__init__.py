"""Evaluation: language-model perplexity and bits per byte, classification metrics (scikit-learn)
with a TF-IDF baseline, few-shot in-context classification, and bias probes. Pure cores here;
``ray_eval.py`` batches large sets over Ray Data."""
