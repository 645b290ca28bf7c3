"""The lean GPT-2 and Llama forwards of the engine against the transformers forward they replace."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from pipeline.model.build import ModelConfig, build_model
from pipeline.serve import fastpath
from pipeline.serve.engine import Engine, SamplingParams
from tests.helpers import decode_with_arrivals


@pytest.fixture(scope="module")
def tok(tiny_prepared):
    return transformers.AutoTokenizer.from_pretrained(str(tiny_prepared[0] / "tokenizer"))


@pytest.fixture(scope="module", params=["gpt2", "gpt2-gelu_new", "llama", "llama-gqa"])
def lm(tok, request):
    """Both families; GPT-2 also with OpenAI's checkpoints' activation spelling ("gelu_new", ours
    is "gelu_pytorch_tanh"); Llama also with grouped-query attention (2 query heads per key)."""
    arch, _, variant = request.param.partition("-")
    cfg = ModelConfig(arch=arch, preset="custom", n_layer=2, n_head=4, n_embd=64, max_seq_len=96,
                      n_kv_head=2 if variant == "gqa" else None)
    lm = build_model(cfg, len(tok), tok.pad_token_id, tok.eos_token_id, seed=7)
    if variant == "gelu_new":
        lm.config.activation_function = "gelu_new"
        for block in lm.transformer.h:
            block.mlp.act = transformers.activations.ACT2FN["gelu_new"]
    with torch.no_grad():  # a freshly initialized model attends almost uniformly: sharpen it, so that
        for name, p in lm.named_parameters():  # a wrong key, value or mask shows in the logits
            if name.endswith(("attn.c_attn.weight", "q_proj.weight", "k_proj.weight")):
                p.mul_(6.0 if "c_attn" in name else 2.5)
    return lm.eval()


PROMPTS = ["the market", "a long sport story about the final", "news", "shares rose in the morning trade"]


def test_logits_match_the_transformers_forward_with_padding_and_growth(lm, tok):
    """Prefill of left-padded rows, then decode steps past the first cache capacity: the last
    position's logits equal transformers' (same mask and positions) at every step."""
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    width = max(map(len, ids))
    x = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    cache = fastpath.KVCache([], [], 0)
    feed = x
    with torch.inference_mode():
        for step in range(40):  # capacity starts at 32 columns: it grows twice
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            ours = fastpath.forward_once(lm, feed, pos[:, -feed.shape[1]:], mask, cache)
            ref = lm(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1]
            torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
            feed = ref.argmax(-1, keepdim=True)
            x, mask = torch.cat([x, feed], 1), torch.cat([mask, torch.ones_like(feed)], 1)
    assert cache.length == x.shape[1] - 1 and cache.capacity >= cache.length


def test_engine_fast_path_equals_transformers_path_through_merges(lm, tok):
    """Continuous batching (rows joining mid-flight, rows leaving, padding dropped) gives the same
    greedy tokens and the same seeded samples on both paths."""
    fast, slow = Engine(lm, tok, max_batch_size=8), Engine(lm, tok, max_batch_size=8, fast_path=False)
    assert fast.fast is not None and slow.fast is None

    def run(engine, temperature):
        reqs = [(engine.encode(p), SamplingParams(max_tokens=n, temperature=temperature, seed=11))
                for p, n in zip(PROMPTS, (30, 6, 14, 9))]
        return decode_with_arrivals(engine, reqs, {3: [1, 2], 5: [3]})

    for temperature in (0, 0.8):
        assert run(fast, temperature) == run(slow, temperature)


def test_merged_and_compacted_caches_give_the_logits_of_a_full_forward(lm, tok):
    """After rows join (caches left-padded and stacked) and rows leave (cache rows selected,
    shared padding dropped), the next step's logits equal a no-cache forward over the batch."""
    engine = Engine(lm, tok, max_batch_size=8)

    def check(run):
        pos = (run.mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            ref = lm(input_ids=run.ids, attention_mask=run.mask, position_ids=pos, use_cache=False).logits[:, -1]
            ours = fastpath.forward_once(lm, run.next_ids, pos[:, -1:], run.mask, copy.deepcopy(run.cache))
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)

    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0)  # noqa: E731
    run = engine.begin([(engine.encode(PROMPTS[0]), greedy(3)), (engine.encode(PROMPTS[2]), greedy(40))])
    for _ in range(2):
        engine.step(run)
    new = engine.begin([(engine.encode(PROMPTS[1]), greedy(40))])
    engine.step(new)
    run = engine.merge(run, new)  # the new row is the longer one: the running rows get padded
    check(run)
    engine.step(run)
    engine.step(run)  # row 0 reaches max_tokens
    assert [o for o, _ in engine.compact(run)] == [0]
    check(run)
    new = engine.begin([(engine.encode(PROMPTS[2]), greedy(5))])
    engine.step(new)
    run = engine.merge(run, new)  # now the new row is the shorter one
    check(run)


def test_int8_model_uses_the_fast_path_with_the_same_output(lm, tok):
    from pipeline.compress.quantize import quantize_int8

    q = quantize_int8(copy.deepcopy(lm))
    reqs = [(tok(p, add_special_tokens=False)["input_ids"], SamplingParams(max_tokens=20, temperature=0)) for p in PROMPTS]
    fast, slow = Engine(q, tok), Engine(q, tok, fast_path=False)
    assert fast.fast is not None
    assert [g.token_ids for g in fast.generate(reqs)] == [g.token_ids for g in slow.generate(reqs)]


def test_pruned_models_use_the_fast_path_with_the_same_output(lm, tok):
    from pipeline.compress.prune import structured_prune

    pruned = copy.deepcopy(lm)
    structured_prune(pruned, mlp_keep=0.5, heads_keep=1.0 if lm.config.model_type == "gpt2" else 0.5)
    reqs = [(tok(p, add_special_tokens=False)["input_ids"], SamplingParams(max_tokens=20, temperature=0)) for p in PROMPTS]
    fast, slow = Engine(pruned, tok), Engine(pruned, tok, fast_path=False)
    assert fast.fast is not None
    assert [g.token_ids for g in fast.generate(reqs)] == [g.token_ids for g in slow.generate(reqs)]


def test_other_architectures_keep_the_transformers_forward(tok):
    config = transformers.OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                    pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
                                    eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    engine = Engine(transformers.OPTForCausalLM(config).eval(), tok)
    assert engine.fast is None
    reqs = [(engine.encode(p), SamplingParams(max_tokens=12, temperature=0)) for p in PROMPTS[:2]]
    assert [g.token_ids for g in engine.generate(reqs)] == [g.token_ids for g in engine.generate(reqs, use_cache=False)]


def test_padded_query_rows_never_produce_nan():
    bias = fastpath.attention_bias(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]), 4, torch.float32)
    assert bias.shape == (2, 1, 4, 4)
    assert torch.isfinite(bias).any(-1).all()  # every query row sees at least one column
    assert bias[0, 0, 3].tolist() == [float("-inf"), float("-inf"), 0.0, 0.0]
    assert bias[1, 0, 1].tolist() == [0.0, 0.0, float("-inf"), float("-inf")]
