"""The generation engine and dynamic batcher without Ray or HTTP."""

from __future__ import annotations

import asyncio

import pytest
import torch
import transformers

from pipeline.model.build import ModelConfig, build_model
from pipeline.serve.batcher import DynamicBatcher, Overloaded
from pipeline.serve.engine import Engine, SamplingParams, penalize, sample
from tests.helpers import decode_with_arrivals


@pytest.fixture(scope="module")
def engine(tiny_prepared):
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_prepared[0] / "tokenizer"))
    model = build_model(ModelConfig(preset="tiny", max_seq_len=64), len(tok), tok.pad_token_id, tok.eos_token_id, seed=5)
    return Engine(model, tok, max_batch_size=4)


def test_kv_cache_greedy_equals_no_cache_token_for_token(engine):
    reqs = [(engine.encode(p), SamplingParams(max_tokens=24, temperature=0)) for p in ("the market", "a long sport story")]
    cached = engine.generate(reqs)
    plain = engine.generate(reqs, use_cache=False)
    assert [g.token_ids for g in cached] == [g.token_ids for g in plain]
    alone = engine.generate(reqs[:1])[0]
    assert alone.token_ids == cached[0].token_ids  # left padding in a batch changes nothing


def test_padded_vocabulary_rows_are_never_sampled(engine):
    # the model has rows past the tokenizer's ids (vocabulary padded to a multiple of 64); even
    # when a padded row has the largest logit, only ids the tokenizer can decode come out
    n_tok = len(engine.tokenizer)
    assert engine.model.config.vocab_size > n_tok and engine.vocab == n_tok
    head = engine.model.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[n_tok:] = 1e4
    head.bias = torch.nn.Parameter(bias)
    try:
        for temperature in (0, 1.0):
            g = engine.generate([(engine.encode("the market"), SamplingParams(max_tokens=8, temperature=temperature, seed=1))])[0]
            assert g.token_ids and max(g.token_ids) < n_tok
    finally:
        head.bias = None


def test_rows_joining_a_running_batch_decode_as_alone(engine):
    """Continuous batching: requests merged into a batch mid-flight (different prompt lengths, KV
    caches left-padded) and rows leaving it give the tokens each request gets alone."""
    prompts = ["the market", "a long sport story about the final", "news", "shares rose in the morning trade"]
    reqs = [(engine.encode(p), SamplingParams(max_tokens=n, temperature=0)) for p, n in zip(prompts, (20, 6, 14, 9))]
    alone = [engine.generate([r])[0].token_ids for r in reqs]
    assert decode_with_arrivals(engine, reqs, {3: [1, 2], 5: [3]}) == alone


def test_sampling_filters():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    rng = torch.Generator().manual_seed(0)
    assert sample(logits, SamplingParams(temperature=0), rng) == 1
    draws = {sample(logits, SamplingParams(temperature=1.0, top_k=2), rng) for _ in range(200)}
    assert draws == {1, 2}
    assert {sample(logits, SamplingParams(temperature=1.0, top_p=0.01), rng) for _ in range(50)} == {1}
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


def test_penalties_follow_openai_and_vllm_definitions():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    got = penalize(logits, [4], [0, 0, 2], SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    # token 0 twice: 2 - 0.5 - 2 * 0.25; token 2 once: 0.5 - 0.5 - 0.25; the prompt's token 4 untouched
    torch.testing.assert_close(got, torch.tensor([1.0, -1.0, -0.25, 3.0, -2.0]))
    got = penalize(logits, [4], [0, 1], SamplingParams(repetition_penalty=2.0))
    torch.testing.assert_close(got, torch.tensor([1.0, -2.0, 0.5, 3.0, -4.0]))  # prompt and generation alike
    got = penalize(logits, [4], [0], SamplingParams(repetition_penalty=2.0, logit_bias=((0, -100.0), (1, 5.0))))
    torch.testing.assert_close(got, torch.tensor([-99.0, 4.0, 0.5, 3.0, -4.0]))  # the bias after the penalty
    assert torch.equal(logits, torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0]))  # the input is left as it was
    assert not SamplingParams().penalized
    for bad in ({"presence_penalty": 2.5}, {"frequency_penalty": -3}, {"repetition_penalty": 0},
                {"repetition_penalty": float("nan")}, {"logit_bias": ((3, 101.0),)}, {"logit_bias": ((-1, 1.0),)}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


def test_penalized_greedy_decoding_matches_a_plain_loop(engine):
    """With penalties, greedy decoding in a batch (cache, padding) picks at each step the best
    token of the model's logits after the penalties, computed here from a plain forward; the
    penalties change what a repetitive tiny model says."""
    prompts = [engine.encode(p) for p in ("the market", "a long sport story about the match")]
    for params in (SamplingParams(max_tokens=12, temperature=0, frequency_penalty=1.5, presence_penalty=0.5),
                   SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.8)):
        gens = engine.generate([(p, params) for p in prompts])
        plain = engine.generate([(p, SamplingParams(max_tokens=12, temperature=0)) for p in prompts])
        assert [g.token_ids for g in gens] != [g.token_ids for g in plain]
        for ids, g in zip(prompts, gens):
            out = []
            for _ in range(len(g.token_ids)):
                with torch.no_grad():
                    row = engine.model(torch.tensor([ids + out])).logits[0, -1, :engine.vocab].float()
                counts = torch.zeros(engine.vocab)
                for t in out:
                    counts[t] += 1
                row = row - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
                for t in set(ids + out):
                    row[t] = row[t] / params.repetition_penalty if row[t] > 0 else row[t] * params.repetition_penalty
                out.append(int(row.argmax()))
            assert out == g.token_ids


def test_min_tokens_and_ignore_eos(engine):
    """min_tokens holds EOS and stop strings off until that many tokens; ignore_eos generates
    through EOS to max_tokens (an EOS adds no text)."""
    ids = engine.encode("the market")
    eos = ((engine.eos_id, 100.0),)  # EOS would come first every step
    assert engine.generate([(ids, SamplingParams(max_tokens=8, temperature=0, logit_bias=eos))])[0].token_ids == []
    g = engine.generate([(ids, SamplingParams(max_tokens=8, temperature=0, logit_bias=eos, min_tokens=5))])[0]
    assert len(g.token_ids) == 5 and engine.eos_id not in g.token_ids and g.finish_reason == "stop"
    g = engine.generate([(ids, SamplingParams(max_tokens=6, temperature=0, logit_bias=eos, ignore_eos=True))])[0]
    assert g.token_ids == [engine.eos_id] * 6 and g.text == "" and g.finish_reason == "length"
    plain = engine.generate([(ids, SamplingParams(max_tokens=12, temperature=0))])[0]
    stop = (plain.text[0],)  # matches at once without min_tokens
    assert engine.generate([(ids, SamplingParams(max_tokens=12, temperature=0, stop=stop))])[0].text == ""
    held = engine.generate([(ids, SamplingParams(max_tokens=12, temperature=0, stop=stop, min_tokens=4))])[0]
    assert len(held.token_ids) >= 4 and held.text.startswith(plain.text[:1])
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_context_overflow_is_refused(engine):
    with pytest.raises(ValueError, match="context length"):
        engine.generate([(engine.encode("x"), SamplingParams(max_tokens=1000))])


def test_models_of_other_families_decode_with_the_transformers_forward(engine):
    # a local model of a family without a lean decoder (here BLOOM: ALiBi, no position table, so
    # its config records no context length) decodes through the transformers forward, cache and
    # no cache agreeing; its context length comes from the serve config or the tokenizer
    tok = engine.tokenizer
    cfg = transformers.BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=4,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    bloom = transformers.BloomForCausalLM(cfg)
    with pytest.raises(ValueError, match="context_length"):
        Engine(bloom, tok)
    e = Engine(bloom, tok, context_length=48)
    assert e.fast is None and e.context_length == 48
    reqs = [(e.encode(p), SamplingParams(max_tokens=10, temperature=0)) for p in ("the market", "a long sport story")]
    assert [g.token_ids for g in e.generate(reqs)] == [g.token_ids for g in e.generate(reqs, use_cache=False)]
    with pytest.raises(ValueError, match="context length"):
        e.generate([(e.encode("x"), SamplingParams(max_tokens=48))])
    old = tok.model_max_length
    tok.model_max_length = 40
    try:
        assert Engine(bloom, tok).context_length == 40
    finally:
        tok.model_max_length = old


def test_batcher_batches_streams_and_bounds_its_queue(engine):
    async def main():
        b = DynamicBatcher(engine, max_batch_size=4, batch_wait_s=0.05, max_queue=2)

        async def one(prompt):
            text, final = "", None
            async for ev in await b.submit(engine.encode(prompt), SamplingParams(max_tokens=10, temperature=0)):
                text += ev.delta
                final = ev
            return text, final.generation.text, final.batch_size
        res = await asyncio.gather(*[one(p) for p in ("a", "b")])
        assert all(t == full for t, full, _ in res) and max(n for *_, n in res) == 2

        async def unary(prompt):  # no deltas, only the final event, the same text as streamed
            events = [ev async for ev in await b.submit(engine.encode(prompt), SamplingParams(max_tokens=10, temperature=0),
                                                        stream=False)]
            assert len(events) == 1 and events[0].finished
            return events[0].generation.text
        mixed = await asyncio.gather(unary("a"), one("b"))
        assert mixed[0] == res[0][1] and mixed[1][0] == res[1][1]
        streams = [await b.submit(engine.encode("c"), SamplingParams(max_tokens=5)) for _ in range(2)]
        with pytest.raises(Overloaded):
            for _ in range(3):
                await b.submit(engine.encode("c"), SamplingParams(max_tokens=5))
        for s in streams:
            async for _ in s:
                pass
    asyncio.run(main())


def test_cancelled_rows_stop_and_leave_the_others_unchanged(engine):
    reqs = [(engine.encode(p), SamplingParams(max_tokens=20, temperature=0)) for p in ("the market", "sport news")]
    gens = engine.generate(reqs, cancelled=lambda row: row == 0)
    assert gens[0].finish_reason == "cancelled" and gens[0].token_ids == []
    assert gens[1].token_ids == engine.generate(reqs[1:])[0].token_ids


def test_a_request_arriving_mid_batch_joins_it(engine):
    async def main():
        b = DynamicBatcher(engine, max_batch_size=4, batch_wait_s=0.0)
        params = SamplingParams(max_tokens=30, temperature=0)
        first = await b.submit(engine.encode("the market"), params)
        await first.__anext__()  # the first request is decoding
        second = await b.submit(engine.encode("sport news today"), SamplingParams(max_tokens=8, temperature=0))
        finals = {}
        for name, stream in (("second", second), ("first", first)):
            async for ev in stream:
                if ev.finished:
                    finals[name] = ev
        assert finals["second"].batch_size == 2 and finals["first"].batch_size == 2  # joined, not queued behind
        assert b.batch_sizes == [1, 2]
        alone = engine.generate([(engine.encode("the market"), params),
                                 (engine.encode("sport news today"), SamplingParams(max_tokens=8, temperature=0))])
        assert finals["first"].generation.token_ids == alone[0].token_ids
        assert finals["second"].generation.token_ids == alone[1].token_ids
    asyncio.run(main())


def test_a_closed_stream_marks_its_request_cancelled(engine):
    async def main():
        b = DynamicBatcher(engine, max_batch_size=2, batch_wait_s=0.0)
        stream = await b.submit(engine.encode("the market"), SamplingParams(max_tokens=40, temperature=0))
        pending = b._waiting[0]
        await stream.__anext__()  # the first text arrives, then the client goes away
        await stream.aclose()
        assert pending.cancelled
    asyncio.run(main())


def _reference_logprobs(model, ids: list[int], vocab: int) -> torch.Tensor:
    """log p(ids[j] | ids[:j]) for j >= 1, from one plain forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :, :vocab].float()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("use_cache", [True, False])
def test_logprobs_of_generated_and_prompt_tokens_match_a_plain_forward(engine, use_cache):
    """Each generated token's log-probability (and, with prompt_logprobs, each prompt token's)
    is the model's, whatever the batch, padding, cache or lean forward; the alternatives are the
    most likely tokens, best first, so under greedy decoding the first is the chosen one."""
    prompts = [engine.encode(p) for p in ("the market", "a long sport story about the match")]
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=3, prompt_logprobs=2)
    for ids, g in zip(prompts, engine.generate([(p, params) for p in prompts], use_cache=use_cache)):
        ended = [engine.eos_id] if g.finish_reason == "stop" else []  # an EOS that ends the text is listed too
        assert len(g.logprobs) == len(g.token_ids) + len(ended) and len(g.prompt_logprobs) == len(ids)
        full = ids + g.token_ids + ended
        ref = _reference_logprobs(engine.model, full, engine.vocab)
        got = [lp for _, lp, _ in g.prompt_logprobs[1:]] + [lp for _, lp, _ in g.logprobs]
        torch.testing.assert_close(torch.tensor(got), ref, atol=2e-4, rtol=0)
        assert g.prompt_logprobs[0] == (ids[0], None, None)
        assert [t for t, _, _ in g.prompt_logprobs] == ids and [t for t, _, _ in g.logprobs] == g.token_ids + ended
        for tok, lp, top in g.logprobs:
            assert len(top) == 3 and top[0][0] == tok and top[0][1] == pytest.approx(lp)
            assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert all(len(top) == 2 for _, _, top in g.prompt_logprobs[1:])


def test_an_eos_that_ends_the_text_has_its_logprob(engine):
    """A text ended by EOS lists the EOS's log-probability last (the text leaves it out): a client
    scoring a prompt with max_tokens 1 drops the last entry as the generated one, whatever it is."""
    head = engine.model.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[engine.eos_id] = 1e4
    head.bias = torch.nn.Parameter(bias)
    try:
        # the transformers forward (the lean one has no head bias to plant)
        g = engine.generate([(engine.encode("the market"), SamplingParams(max_tokens=1, temperature=0, logprobs=1))],
                            use_cache=False)[0]
    finally:
        head.bias = None
    assert g.finish_reason == "stop" and g.token_ids == [] and g.text == ""
    assert [(t, round(lp, 3)) for t, lp, _ in g.logprobs] == [(engine.eos_id, 0.0)]


def test_a_prompt_is_scored_alone_with_max_tokens_zero(engine):
    ids = engine.encode("shares in the company rose")
    g = engine.generate([(ids, SamplingParams(max_tokens=0, prompt_logprobs=0))])[0]
    assert g.token_ids == [] and g.finish_reason == "length" and g.logprobs is None
    ref = _reference_logprobs(engine.model, ids, engine.vocab)
    torch.testing.assert_close(torch.tensor([lp for _, lp, _ in g.prompt_logprobs[1:]]), ref, atol=2e-4, rtol=0)
    assert all(top == [] for _, _, top in g.prompt_logprobs[1:])
    with pytest.raises(ValueError, match="max_tokens must be >= 1 \\(0 only when scoring the prompt\\)"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="logprobs must be >= 0"):
        SamplingParams(logprobs=-1)
