"""The whole workflow on the bundled corpora, on a local Ray cluster (``make demo``).

    python -m jobs.demo

1. prepare: bbc-news + chatterbot -> clean, deduplicated, packed shards (prepare_demo.yaml)
2. pretrain: the small GPT-2 on those shards with Ray Train, 2 workers (pretrain_demo.yaml)
3. fine-tune: a BBC topic classifier and a chatterbot chat model (finetune_*_demo.yaml)
4. evaluate: perplexity, classifier vs TF-IDF baseline, few-shot, bias probe (evaluate_demo.yaml)
5. tune: a 4-trial ASHA sweep of short pretraining runs (tune_demo.yaml)
6. compress: pruned and int8 variants with a size / speed / quality table (compress_demo.yaml)
7. serve: the models behind the OpenAI-compatible HTTP API; one completion, chat, streamed
   completion, classification and feedback, then shut down (serve_models_demo.yaml)

then a summary table. Each stage is skipped when its output for the same config exists.
"""

from __future__ import annotations

import sys
import time

from jobs.common import setup_logging


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    from jobs import compress, evaluate, finetune, prepare, pretrain, tune
    from jobs import serve as serve_job
    from pipeline.compress.run import render_table, run_compress
    from pipeline.serve.launch import smoke, start
    from pipeline.data.prepare import run_prepare
    from pipeline.evaluate.run import run_evaluate
    from pipeline.finetune.finetune import run_finetune
    from pipeline.ray_utils import init_ray
    from pipeline.train.pretrain import run_pretrain
    from pipeline.tune.sweep import run_tune

    configs = {
        "prepare": prepare.parse_config(["--config", "jobs/configs/prepare_demo.yaml"]),
        "pretrain": pretrain.parse_config(["--config", "jobs/configs/pretrain_demo.yaml"]),
        "classify": finetune.parse_config(["--config", "jobs/configs/finetune_classify_demo.yaml"]),
        "sft": finetune.parse_config(["--config", "jobs/configs/finetune_sft_demo.yaml"]),
        "evaluate": evaluate.parse_config(["--config", "jobs/configs/evaluate_demo.yaml"]),
        "tune": tune.parse_config(["--config", "jobs/configs/tune_demo.yaml"]),
        "compress": compress.parse_config(["--config", "jobs/configs/compress_demo.yaml"]),
        "serve": serve_job.parse_config(["--config", "jobs/configs/serve_models_demo.yaml"]),
    }
    started = init_ray()
    t0 = time.time()
    times = {}
    try:
        def timed(name, fn, *args):
            t = time.time()
            out = fn(*args)
            times[name] = time.time() - t
            return out

        manifest = timed("prepare", run_prepare, configs["prepare"])
        pre = timed("pretrain", run_pretrain, configs["pretrain"])
        cls = timed("finetune classifier", run_finetune, configs["classify"])
        sft = timed("finetune chat (SFT)", run_finetune, configs["sft"])
        ev = timed("evaluate", run_evaluate, configs["evaluate"])
        sweep = timed("tune", run_tune, configs["tune"])
        comp = timed("compress", run_compress, configs["compress"])
        url = timed("serve start", start, configs["serve"])
        answers = timed("serve requests", smoke, url, configs["serve"])
        print("\n== prepare ==")
        print(prepare.summary(manifest))
        c, b = ev["classification"], ev["classification"]["baseline_tfidf_logreg"]
        rows = [
            ("pretrain val loss / perplexity", f"{ev['lm']['loss']:.3f} / {ev['lm']['perplexity']:.1f} "
                                               f"({ev['lm']['bits_per_byte']:.3f} bits/byte, {pre['steps']} steps)"),
            ("BBC classifier macro-F1 (test)", f"{c['f1_macro']:.3f} (accuracy {c['accuracy']:.3f}, {c['support']} articles)"),
            ("TF-IDF + LogReg macro-F1 (same split)", f"{b['f1_macro']:.3f} (accuracy {b['accuracy']:.3f}); on the "
             f"classifier's reading ({c['baseline_tfidf_logreg_same_reading']['reading']}): "
             f"{c['baseline_tfidf_logreg_same_reading']['f1_macro']:.3f}"),
            ("classifier vs TF-IDF (paired)", f"{c['classifier_vs_baseline']['only_a_correct']} article(s) right only by "
             f"the classifier, {c['classifier_vs_baseline']['only_b_correct']} only by TF-IDF; McNemar p = "
             f"{c['classifier_vs_baseline']['mcnemar_exact_p']:.2f}, F1 difference 95% interval "
             + " to ".join(f"{x:+.3f}" for x in c['classifier_vs_baseline']['f1_macro_diff_ci95'])),
            (f"{ev['fewshot']['k']}-shot macro-F1 (pretrained LM)", f"{ev['fewshot']['f1_macro']:.3f}; calibrated "
                                                                    f"{ev['fewshot']['calibrated']['f1_macro']:.3f} "
                                                                    f"({ev['fewshot']['queries']} queries)"),
            ("chat SFT best val loss", f"{sft['best_val_loss']:.3f} ({sft['examples']['train']} dialogs, {sft['rejected']} rejected)"),
            ("bias probe", f"mean gap {ev['bias']['mean_gap']:.3f} nats, stereotyped preferred "
                           f"{ev['bias']['share_stereotyped']:.0%} of {ev['bias']['n']} pairs (whole sentences: "
                           f"{ev['bias']['sentence']['mean_gap']:.3f}, {ev['bias']['sentence']['share_stereotyped']:.0%})"),
            ("sweep best (val loss)", f"{sweep['best']['val_loss']:.3f}: lr {sweep['best']['lr']:.2e}, batch "
                                      f"{sweep['best']['batch_size']}, weight decay {sweep['best']['weight_decay']}, warmup "
                                      f"{sweep['best']['warmup_steps']} ({sweep['num_trials']} trials, "
                                      f"{sweep['stopped_early']} stopped early by ASHA)"),
            ("sweep best config", sweep["best_config"]),
        ]
        print("\n== compression ==")
        print(render_table(comp["rows"]))
        print(f"== serving at {url} ==")
        for what, answer in answers:
            print(f"  {what}: {answer!r}")
        print("\n== summary ==")
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")
        print("\n  stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
        print(f"  reports: {manifest['output_dir']}/report/report.md, {ev['output_dir']}/report.md, "
              f"{pre['run_dir']}/loss_curves.png")
        print(f"\ndemo finished in {time.time() - t0:.1f}s")
        return 0
    finally:
        from ray import serve

        serve.shutdown()
        if started:
            import ray

            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
