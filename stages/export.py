"""Export a trained student for deployment, checked against the run before it is kept.

    kdcache export run=data/runs/CACHE/RUN_ID               # the format that fits the student
    kdcache export run=RUN_DIR format=onnx                  # torch students -> student.onnx
    kdcache export run=RUN_DIR format=skops                 # scikit-learn students -> student.skops
    kdcache export run=RUN_DIR format=hf                    # lm students -> student.hf/ (a Hugging
                                                            # Face model directory + its tokenizer)

Writes the file (or folder) and export.json (how to feed it, and the check's figures) into the
run directory.
"""

from __future__ import annotations

from pipeline import runtime
from pipeline.config import ExportConfig
from pipeline.export import export_run, open_run
from pipeline.settings import resolve


def main(args: list[str]) -> dict:
    cfg = resolve(ExportConfig, args, verb="export")
    run = open_run(cfg.run)
    with runtime.torch_threads(cfg.threads):
        record = export_run(run, cfg.format)
    check = record["check"]
    print(f"exported {record['path']} ({record['format']}, {record['bytes']:,} bytes)")
    if "folder" in record:  # a model directory: a language model, checked on windows of tokens
        g = check["generate"]
        print(f"checked on {check['windows']:,} test windows ({check['positions']:,} positions): max |logit "
              f"difference| {check['max_abs_logit_diff']:.2e}, next-token predictions agree "
              f"{check['predictions_agree']:,}/{check['positions']:,}, test perplexity "
              f"{check['test_perplexity']:.4f} (the run recorded "
              f"{record['recorded_test_perplexity'] or float('nan'):.4f}); greedy generate() gave the "
              f"student's own greedy tokens on {g['same'] + g['near_ties']}/{g['prompts']} test prompts")
        print(f"load it with transformers: AutoModelForCausalLM.from_pretrained and "
              f"AutoTokenizer.from_pretrained({record['path']!r}); how to feed it: {run.root / 'export.json'}")
        return record
    print(f"checked on {check['rows']:,} test rows: max |logit difference| "
          f"{check['max_abs_logit_diff']:.2e}, predictions agree {check['predictions_agree']:,}"
          f"/{check['rows']:,}, test accuracy {check['test_accuracy']:.4f} (the run recorded "
          f"{record['recorded_test_accuracy'] or float('nan'):.4f})")
    print(f"how to feed it: {run.root / 'export.json'}")
    return record
