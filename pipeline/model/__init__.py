"""Model definitions: GPT-2 / Llama causal LMs and a BERT-style masked LM built from scratch from
``transformers`` configs. Nothing here knows about Ray or distribution."""
