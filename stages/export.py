"""Export a trained student for deployment, checked against the run before it is kept.

    kdcache export run=data/runs/CACHE/RUN_ID               # the format that fits the student
    kdcache export run=RUN_DIR format=onnx                  # torch students -> student.onnx
    kdcache export run=RUN_DIR format=skops                 # scikit-learn students -> student.skops

Writes the file and export.json (how to feed it, and the check's figures) into the run directory.
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
    print(f"checked on {check['rows']:,} test rows: max |logit difference| "
          f"{check['max_abs_logit_diff']:.2e}, predictions agree {check['predictions_agree']:,}"
          f"/{check['rows']:,}, test accuracy {check['test_accuracy']:.4f} (the run recorded "
          f"{record['recorded_test_accuracy'] or float('nan'):.4f})")
    print(f"how to feed it: {run.root / 'export.json'}")
    return record
