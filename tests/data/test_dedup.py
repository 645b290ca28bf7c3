"""Exact and fuzzy dedup cores: planted near-duplicates are found, distinct documents are kept."""

import random

import numpy as np
import pyarrow as pa
import pytest

from pipeline import schema as S
from pipeline.data.decontam import NgramIndex
from pipeline.data.dedup import bucket_edges, components_from_edges, content_hash, exact_dedup_block, verify_component
from pipeline.data.minhash import (
    MinHashConfig, MinHasher, UnionFind, band_keys, candidate_probability, estimated_jaccard, jaccard, shingle_hashes,
)

VOCAB = [f"w{i}" for i in range(5000)]


def random_doc(rng, n=200):
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def perturb(rng, text, frac):
    words = text.split()
    for i in rng.sample(range(len(words)), int(frac * len(words))):
        words[i] = rng.choice(VOCAB)
    return " ".join(words)


def test_exact_dedup_block_keeps_smallest_id():
    rows = [
        {S.DOC_ID: "b", S.TEXT: "same", S.STATUS: "kept"},
        {S.DOC_ID: "a", S.TEXT: "same", S.STATUS: "kept"},
        {S.DOC_ID: "c", S.TEXT: "other", S.STATUS: "kept"},
        {S.DOC_ID: "d", S.TEXT: "same", S.STATUS: "kept"},
    ]
    table = S.docs_table(rows)
    table = table.append_column(S.CONTENT_HASH, pa.array([content_hash(r[S.TEXT]) for r in rows]))
    out = {r[S.DOC_ID]: r for r in exact_dedup_block(table).to_pylist()}
    assert out["a"][S.STATUS] == "kept" and out["c"][S.STATUS] == "kept"
    for d in ("b", "d"):
        assert out[d][S.STATUS] == "dropped" and out[d][S.REASON] == "exact_duplicate"
        assert out[d][S.REPRESENTATIVE] == "a" and out[d][S.TEXT] is None and out[d][S.RAW_EXCERPT] == "same"
    assert len(out) == 4


def test_shingles_and_jaccard():
    a = shingle_hashes("the cat sat on the mat today", 3)
    assert a.dtype == np.uint64 and len(a) == 5 and np.all(np.diff(a.astype(np.int64)) > 0)
    assert jaccard(a, a) == 1.0
    b = shingle_hashes("The CAT sat, on the mat today!", 3)  # case and punctuation do not matter
    assert jaccard(a, b) == 1.0
    assert len(shingle_hashes("two words", 5)) == 1  # short text: one shingle of the whole text
    assert len(shingle_hashes("", 5)) == 0


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    hasher = MinHasher(256, seed=1)
    errors = []
    for frac in (0.05, 0.2, 0.5):
        x = random_doc(rng, 400)
        y = perturb(rng, x, frac)
        sx, sy = shingle_hashes(x, 5), shingle_hashes(y, 5)
        errors.append(abs(estimated_jaccard(hasher.signature(sx), hasher.signature(sy)) - jaccard(sx, sy)))
    assert max(errors) < 0.1, errors


def test_lsh_finds_planted_near_duplicates_and_keeps_distinct():
    rng = random.Random(1)
    cfg = MinHashConfig()
    hasher = MinHasher(cfg.num_perm, cfg.seed)
    originals = [random_doc(rng) for _ in range(40)]
    docs = {f"orig{i:02d}": t for i, t in enumerate(originals)}
    for i in range(20):  # ~3% of words changed: Jaccard of 5-shingles ~0.85
        docs[f"near{i:02d}"] = perturb(rng, originals[i], 0.03)
    keys, ids = [], []
    for doc_id, text in docs.items():
        for k in band_keys(hasher.signature(shingle_hashes(text, cfg.shingle_size)), cfg.bands, cfg.rows):
            keys.append(k)
            ids.append(doc_id)
    a, b = bucket_edges(np.array(keys, dtype=np.int64), np.array(ids, dtype=object))
    comps = components_from_edges([(a, b)])
    for i in range(20):
        assert comps[f"near{i:02d}"] == comps[f"orig{i:02d}"]
    for i in range(20, 40):
        assert f"orig{i:02d}" not in comps  # distinct documents are no candidates
    # verification keeps the true pairs and cluster representatives are the smallest ids
    for root in {comps[f"orig{i:02d}"] for i in range(20)}:
        members = sorted(d for d, r in comps.items() if r == root)
        edges = [(x, y) for x, y in zip(a, b) if comps[x] == root]
        dups = verify_component(members, [shingle_hashes(docs[m], 5) for m in members], edges, 0.7)
        assert [d[S.DOC_ID] for d in dups] == [m for m in members if m != min(members)]
        assert all(d[S.REPRESENTATIVE] == min(members) and d[S.SIMILARITY] >= 0.7 for d in dups)


def test_verification_rejects_false_candidates():
    x = " ".join(f"w{i}" for i in range(100))
    y = " ".join(f"w{i}" for i in range(50)) + " " + " ".join(f"z{i}" for i in range(50))
    sx, sy = shingle_hashes(x, 5), shingle_hashes(y, 5)
    assert verify_component(["x", "y"], [sx, sy], [("x", "y")], 0.8) == []
    assert len(verify_component(["x", "y"], [sx, sy], [("x", "y")], 0.3)) == 1


def test_bucket_edges_star_and_union_find():
    keys = np.array([1, 1, 1, 2, 2, 3], dtype=np.int64)
    ids = np.array(["c", "a", "b", "d", "c", "e"], dtype=object)
    a, b = bucket_edges(keys, ids)
    assert sorted(zip(a, b)) == [("a", "b"), ("a", "c"), ("c", "d")]
    uf = UnionFind()
    for x, y in zip(a, b):
        uf.union(x, y)
    assert uf.components() == {"a": "a", "b": "a", "c": "a", "d": "a"}


def test_lsh_curve_and_config_checks():
    assert candidate_probability(0.9, 20, 6) > 0.99
    assert candidate_probability(0.3, 20, 6) < 0.02
    assert 0.55 < MinHashConfig().lsh_threshold < 0.65
    with pytest.raises(ValueError, match="bands x rows"):
        MinHashConfig(num_perm=10, bands=5, rows=3)


def test_decontamination_index():
    eval_text = "the quick brown fox jumps over the lazy dog near the river bank today at noon"
    index = NgramIndex.from_texts([eval_text], 13)
    assert index.contaminated("Intro words. " + eval_text + " and more")
    assert not index.contaminated("the quick brown fox jumps over the lazy cat near the river bank today")
    assert not index.contaminated("short text")
