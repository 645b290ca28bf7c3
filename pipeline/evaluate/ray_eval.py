"""Ray Data wrappers for large evaluation sets: an actor pool (each actor loads the model once)
maps the pure scorers over batches. Fractional CPUs per actor leave room for the read tasks."""

from __future__ import annotations

import numpy as np

from pipeline.evaluate.lm import sequence_nll
from pipeline.model.build import load_pretrained, quiet_loading


def actor_process() -> None:
    """An evaluation actor's process: one torch thread (the pool's actors share the CPUs with the
    read tasks) and no model-loading progress bars in the job's logs."""
    import torch

    torch.set_num_threads(1)
    quiet_loading()


class ClassifierPredictor:
    def __init__(self, model_dir: str, max_len: int | None):
        import transformers

        actor_process()
        self.tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = load_pretrained(transformers.AutoModelForSequenceClassification, model_dir).eval()
        self.max_len = max_len

    def __call__(self, batch: dict) -> dict:
        from pipeline.evaluate.classify import predict_labels

        batch["prediction"] = np.array(predict_labels(self.model, self.tok, list(batch["text"]), self.max_len))
        return batch


class LMScorer:
    def __init__(self, model_dir: str):
        from pipeline.evaluate.lm import load_lm

        actor_process()
        self.model, self.tok, self.masked = load_lm(model_dir)

    def __call__(self, batch: dict) -> dict:
        import torch

        x = torch.tensor(np.stack(batch["input_ids"]), dtype=torch.long)
        if self.masked is not None:
            nll, counts = self.masked(self.model, x)
            return {"nll": nll.numpy(), "tokens": counts.numpy(), "bytes": np.zeros(len(x), dtype=np.int64)}
        nll = sequence_nll(self.model, x).numpy()
        num_bytes = [len(self.tok.decode(r[1:]).encode("utf-8")) for r in x.tolist()]
        return {"nll": nll, "tokens": np.full(len(x), x.shape[1] - 1), "bytes": np.array(num_bytes)}


class TextScorer:
    """Summed NLL / tokens / bytes of each batch of texts (one output row per batch)."""

    def __init__(self, model_dir: str, max_len: int, overlap: int | None = None):
        from pipeline.evaluate.lm import load_lm

        actor_process()
        self.model, self.tok, self.masked = load_lm(model_dir)
        self.max_len, self.overlap = max_len, overlap

    def __call__(self, batch: dict) -> dict:
        from pipeline.evaluate.lm import text_batch_totals

        nll, tokens, num_bytes = text_batch_totals(self.model, self.tok, [str(t) for t in batch["text"]], self.max_len,
                                                   self.masked, self.overlap)
        return {"nll": np.array([nll]), "tokens": np.array([tokens]), "bytes": np.array([num_bytes])}


class FewshotScorer:
    """Each query's label log-likelihoods after the same few-shot examples."""

    def __init__(self, model_dir: str, shots: list, labels: list[str], max_len: int, max_words: int):
        import transformers

        actor_process()
        self.tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = load_pretrained(transformers.AutoModelForCausalLM, model_dir).eval()
        self.shots, self.labels, self.max_len, self.max_words = [tuple(s) for s in shots], labels, max_len, max_words

    def __call__(self, batch: dict) -> dict:
        from pipeline.evaluate.fewshot import score_queries

        scores = score_queries(self.model, self.tok, self.shots, [str(q) for q in batch["text"]], self.labels,
                               self.max_len, self.max_words)
        return {"idx": batch["idx"], "scores": np.array(scores, dtype=np.float64)}


def fewshot_scores(queries: list[str], model_dir: str, shots: list[tuple[str, str]], labels: list[str], max_len: int,
                   max_words: int, actors: int = 2, batch_size: int = 8) -> list[list[float]]:
    """``score_queries`` over an actor pool, in the queries' order."""
    ds = _pool_map(_items([{"idx": i, "text": q} for i, q in enumerate(queries)]), FewshotScorer,
                   {"model_dir": model_dir, "shots": shots, "labels": labels, "max_len": max_len, "max_words": max_words},
                   actors, batch_size, len(queries))
    return [[float(v) for v in s] for s in _in_order(ds, "scores", len(queries))]


class PairScorer:
    """Counterfactual bias pairs -> their log-likelihood gaps (``pair_gaps``: shared tokens, whole
    sentence)."""

    def __init__(self, model_dir: str):
        from pipeline.evaluate.lm import load_lm

        actor_process()
        self.model, self.tok, self.masked = load_lm(model_dir)

    def __call__(self, batch: dict) -> dict:
        from pipeline.evaluate.bias import pair_gaps

        pairs = [{"template": str(t), "stereotyped": str(s), "anti": str(a)}
                 for t, s, a in zip(batch["template"], batch["stereotyped"], batch["anti"])]
        gaps = pair_gaps(self.model, self.tok, pairs, self.masked is not None)
        return {"idx": batch["idx"], "gap": np.array(gaps, dtype=np.float64).reshape(len(pairs), 2)}


def bias_gaps(pairs: list[dict], model_dir: str, actors: int = 2, batch_size: int = 16) -> list[tuple[float, float]]:
    """``pair_gaps`` over an actor pool, in the pairs' order."""
    rows = [{"idx": i, **{k: p[k] for k in ("template", "stereotyped", "anti")}} for i, p in enumerate(pairs)]
    ds = _pool_map(_items(rows), PairScorer, {"model_dir": model_dir}, actors, batch_size, len(rows))
    return [(float(g[0]), float(g[1])) for g in _in_order(ds, "gap", len(pairs))]


def score_texts(texts: list[str], model_dir: str, max_len: int, actors: int = 2, batch_size: int = 8,
                overlap: int | None = None) -> dict:
    """``lm_metrics_from_texts`` over an actor pool (each actor loads the model once)."""
    scored = _pool_map(_items([{"text": t} for t in texts]), TextScorer,
                       {"model_dir": model_dir, "max_len": max_len, "overlap": overlap}, actors, batch_size, len(texts))
    return _totals(scored, model_dir)


def predict_dataset(rows: list[dict], model_dir: str, max_len: int | None, actors: int = 2, batch_size: int = 32) -> list[str]:
    ds = _pool_map(_items(rows), ClassifierPredictor, {"model_dir": model_dir, "max_len": max_len}, actors, batch_size,
                   len(rows))
    return [str(p) for p in _in_order(ds, "prediction", len(rows))]


def score_shards(files: list[str], model_dir: str, actors: int = 2, batch_size: int = 16, max_rows: int = 0,
                 seed: int = 0) -> dict:
    from pipeline.ray_utils import read_parquet

    if max_rows:  # a seeded sample over every shard: the first rows would all come from the first source
        from pipeline.train.data import sample_shard_rows

        sampled = sample_shard_rows(files, max_rows, seed)
        ds, rows = _items([{"input_ids": np.asarray(r, dtype=np.int32)} for r in sampled]), len(sampled)
    else:
        ds, rows = read_parquet(files), None
    return _totals(_pool_map(ds, LMScorer, {"model_dir": model_dir}, actors, batch_size, rows), model_dir)


def _items(rows: list[dict]):
    import ray

    return ray.data.from_items(rows)


def pool_size(actors: int, batch_size: int, rows: int | None) -> int:
    """``actors``, or with ``rows`` known no more actors than half the batches: an actor's start
    (a process, the model loaded) costs about what scoring a couple of batches does, so a
    few-query set is scored by one actor."""
    return actors if rows is None else max(1, min(actors, -(-rows // batch_size) // 2))


def _pool_map(ds, scorer: type, kwargs: dict, actors: int, batch_size: int, rows: int | None = None):
    """``scorer`` (a class: each actor loads the model once) over ``ds`` on an actor pool sized
    by ``pool_size``; half a CPU per actor leaves room for the read tasks."""
    import ray

    from pipeline.ray_utils import check_resources

    check_resources({"CPU": 0.5}, f"evaluation ({scorer.__name__}: actors of half a CPU)")
    size = pool_size(actors, batch_size, rows)
    return ds.map_batches(scorer, fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(size=size),
                          num_cpus=0.5, batch_size=batch_size, batch_format="numpy")


def _in_order(ds, column: str, n: int) -> list:
    """``column`` of the rows of ``ds`` by their ``idx`` 0..n-1 (the pool returns them in any order)."""
    out = {int(r["idx"]): r[column] for r in ds.select_columns(["idx", column]).take_all()}
    return [out[i] for i in range(n)]


def _totals(scored, model_dir: str) -> dict:
    totals = np.zeros(3)
    for b in scored.iter_batches(batch_format="numpy", batch_size=1024):
        totals += [b["nll"].sum(), b["tokens"].sum(), b["bytes"].sum()]
    import transformers

    from pipeline.evaluate.lm import _summary
    from pipeline.model.build import is_masked_lm

    masked = is_masked_lm(transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True))
    return _summary(float(totals[0]), int(totals[1]), int(totals[2]), "masked" if masked else "causal")
