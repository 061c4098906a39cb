"""Stage two: train one student from a teacher cache. The teacher is never loaded.

    kdcache student model=linear_svc                     # sklearn on cached teacher features
    kdcache student model=cnn_small loss=kd temperature=4 alpha=0.9 seed=1
    kdcache student model=mlp width=64 lr=0.03           # any hyperparameter the student declares
    kdcache student model=logreg_soft temperature=2 C=auto

Keys: the run keys (cache, model, loss, seed, ...) and every hyperparameter the student's
constructor and its loss's registration declare (pipeline.students.hyperparameters); any other
key is refused. Writes a run directory (resolved config, metrics.json, the student's weights
as safetensors, a log) under runs_dir, then appends one row to the results table beside the
cache.
"""

from __future__ import annotations

from pipeline.config import StudentConfig

from pipeline.runs import train_student
from pipeline.settings import resolve
from pipeline.students import complete
from pipeline.tracking import describe_store


def main(args: list[str]) -> dict:
    cfg = resolve(StudentConfig, args, verb="student", params=complete)
    row = train_student(cfg)
    trained = ", ".join(p for p in (row["loss"], row.get("target") and f"target={row['target']}",
                                    row.get("temperature") and f"temperature {row['temperature']:g}") if p)
    if row.get("test_perplexity") is not None:  # a language model, from a token cache
        kl = "" if row["kl_teacher_student"] is None else f", KL(t‖s) {row['kl_teacher_student']:.4f}"
        scored = (f"test perplexity {row['test_perplexity']:.2f}, val {row['val_perplexity']:.2f} "
                  f"(teacher test {row['teacher_test_perplexity']:.2f}); next-token accuracy "
                  f"{row['test_accuracy']:.4f}, agreement with the teacher {row['teacher_agreement']:.4f}{kl}")
    else:
        scored = (f"test {row['test_accuracy']:.4f}, val {row['val_accuracy']:.4f}, agreement "
                  f"{row['teacher_agreement']:.4f} (teacher test {row['teacher_test_accuracy']:.4f})")
    print(f"student {row['model']} ({trained or 'no loss'}, seed {row['seed']}): {scored}; "
          f"{row['params']:,} params, fit {row['fit_seconds']:.1f}s\n"
          f"run  {row['run_dir']}\nrow  {row['results']}")
    if row["tracking_run_id"]:
        print(f"mlflow run {row['tracking_run_id']} in {describe_store()}")
    return row
