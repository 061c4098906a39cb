"""Export a finished student run for deployment, verified before it is kept (``kdcache export``).

- A torch student becomes ``student.onnx``: the network alone (input -> logits; no feature taps,
  no training-only loss head), ONNX opset :data:`OPSET`, input ``input`` float32
  ``[batch, *input_shape]`` with a dynamic batch axis, output ``logits`` ``[batch, classes]``.
  It takes inputs preprocessed as the cache's were, ``(x - mean) / std``; the statistics (and
  the run, teacher and dataset it comes from) are recorded in the model's metadata under
  ``kdcache.*`` keys.
- A scikit-learn student becomes ``student.skops``: a plain scikit-learn ``Pipeline`` of the
  fitted StandardScaler and classifier that scores the teacher's cached features (float32,
  the cache's layer, pooled as cached); ``skops.io.load(path)`` loads it with no types to trust
  beyond scikit-learn's own. A margin student's (LinearSVC's) calibration temperature T is in
  ``export.json``: ``softmax(scores / T)`` are the probabilities the run scored, where scores
  are ``decision_function(x)`` ([N, K]; with two classes scikit-learn returns one margin m per
  row, and the scores are ``[-m, m]``).

Students that read text export their text processing with them:

- ``tfidf_logreg`` / ``tfidf_svc`` become ``student.skops`` too: a Pipeline that takes the
  documents themselves (a list of ``str``) through its vectoriser (TfidfVectorizer, or
  HashingVectorizer + TfidfTransformer) to the classifier.
- ``fasttext`` / ``textcnn`` become ``student.onnx`` whose input is ``ids``, int64
  ``[batch, length]`` (both axes dynamic; 0 pads, any amount of padding gives the same logits),
  the hashed n-gram ids of :mod:`pipeline.text_features`; its spec, which replays the ids from
  the documents, is written beside the model as ``featuriser.json`` and kept in its metadata
  (``kdcache.featuriser``). The check then featurises the test documents from that spec.

A language-model student (``lm``, on a token cache) becomes ``student.hf/``, a Hugging Face
model folder (``config.json``, ``model.safetensors``, ``generation_config.json``) with the
cache's tokenizer saved beside it, which transformers' Auto classes load offline; it is checked
with transformers on the cache's test windows and with greedy ``generate`` (pipeline.export_lm).

The ONNX and skops files are checked before they are kept: the exported file, loaded back with onnxruntime or
skops, scores the run's whole test split and must reproduce the student's own scores: finite,
within float32 rounding (:data:`LOGIT_TOLERANCE`, relative to the logits' size; the largest
|logit difference| is reported). Predictions can then differ only on rows whose top two scores
tie within that rounding; how many agree is reported. The file and ``export.json`` (what was
exported, how to feed it, the check's figures) are written beside the run's weights; a failed
export leaves neither (nor a featuriser.json, nor a student.hf/ folder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import storage
from pipeline.cache import TeacherCache, open_cache
from pipeline.cache import format as fmt
from pipeline.config import StudentConfig
from pipeline.errors import KdError, first_line
from pipeline.export_lm import check_hf, files, write_hf
from pipeline.io import atomic_dir, atomic_path, atomic_write_text, sha256_file
from pipeline.runs import WEIGHTS
from pipeline.students import STUDENTS, Student, StudentData, create_student, saved_config
from pipeline.text_features import HashedNgrams

OPSET = 18  # ONNX opset of torch's exporter; onnxruntime >= 1.14 runs it
# format -> the students it exports
FORMATS = {"onnx": "a PyTorch", "skops": "a scikit-learn", "hf": "a language-model"}
EXPORT_RECORD = "export.json"
FEATURISER = "featuriser.json"  # beside a text network's student.onnx: documents -> its ids
BLOCK = 1024  # test rows scored at a time while checking
# the exported ONNX graph may differ from torch by float32 rounding, nothing more
LOGIT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Run:
    """A finished run directory, opened: its resolved config and its results row."""

    root: Path
    config: StudentConfig
    row: dict


def open_run(path: str | Path) -> Run:
    """Open the run directory ``path`` (written by ``kdcache student`` / ``sweep``)."""
    root = Path(path)
    hint = ("pass run=RUN_DIR, a directory `kdcache student` printed (under runs_dir, "
            "e.g. data/runs/CACHE/RUN_ID)")
    if not root.is_dir():
        raise KdError(f"run {root} does not exist or is not a directory; {hint}")
    missing = [n for n in ("config.json", "metrics.json", WEIGHTS) if not (root / n).is_file()]
    if missing:
        raise KdError(f"{root} is not a kdcache run directory (no {', '.join(missing)}); {hint}")
    try:
        config = json.loads((root / "config.json").read_text())
        row = json.loads((root / "metrics.json").read_text())
    except (ValueError, OSError) as exc:
        raise KdError(f"run {root} cannot be read ({type(exc).__name__}); {hint}") from None
    if not isinstance(config, dict) or config.get("kind") != "StudentConfig" or not isinstance(
            config.get("config"), dict):
        raise KdError(f"{root} is not a kdcache run directory (its config.json holds no student "
                      f"config); {hint}")
    missing = [k for k in ("cache", "run_id", "teacher_fingerprint", "dataset_fingerprint")
               if not isinstance(row, dict) or not row.get(k)]
    if missing:
        raise KdError(f"{root} is not a finished kdcache run (its metrics.json records no "
                      f"{', '.join(missing)}); {hint}")
    try:
        cfg = saved_config(config["config"])
    except (TypeError, KdError) as exc:
        raise KdError(f"run {root} has a config.json kdcache cannot read ({exc}); {hint}") from None
    return Run(root, cfg, row)


def fitting_format(run: Run) -> str:
    """The format that fits the run's student, as it declared it (onnx for torch students,
    skops for scikit-learn ones)."""
    return STUDENTS.declared(run.config.model).export


def restore(run: Run) -> tuple[Student, TeacherCache]:
    """The run's trained student rebuilt from its saved weights, and the cache it was trained
    from (whose test split the export is checked on)."""
    cache_root = storage.location(run.row["cache"])  # a folder, or a URL on object storage
    if not (cache_root / fmt.MANIFEST).is_file():
        raise KdError(f"the cache run {run.root.name} was trained from, {cache_root}, is not there; "
                      "export checks the student on that cache's test split: restore the cache "
                      "or rebuild it with the same settings")
    cache = open_cache(cache_root)
    for what in ("teacher", "dataset"):  # the same path may now hold another cache
        recorded, now = run.row[f"{what}_fingerprint"], getattr(cache, f"{what}_fingerprint")
        if recorded != now:
            raise KdError(f"cache {cache_root} now holds another {what} ({what} fingerprint "
                          f"{now[:12]}) than run {run.root.name} was trained from ({recorded[:12]}); "
                          "export checks the student on its own cache's test split: restore that cache")
    return load_fitted(run, cache), cache


def load_fitted(run: Run, cache: TeacherCache) -> Student:
    """The run's trained student, rebuilt from its config and saved weights, for rows of
    ``cache``'s input shape and classes."""
    from safetensors.numpy import load_file

    # (the C that C=auto chose is in the config: runs record what fitting decided)
    overrides = {"C": run.row["C"]} if run.config.param("C") == "auto" and run.row.get("C") else {}
    student = create_student(run.config.model, run.config, **overrides)
    shape = tuple(cache.manifest["teacher"]["input_shape"])
    try:
        tensors = load_file(str(run.root / WEIGHTS))
    except Exception as exc:  # safetensors' own error types: a torn or foreign file
        raise KdError(f"{run.root / WEIGHTS} cannot be read ({first_line(exc, 80)}); "
                      "the run's weights are damaged: train the student again") from None
    try:
        student.load_tensors(tensors, shape, cache.num_classes)
    except NotImplementedError:
        raise KdError(f"student {run.config.model} implements no load_tensors, so its saved "
                      "weights cannot be loaded back for export") from None
    except (KeyError, RuntimeError, ValueError) as exc:
        raise KdError(f"the weights in {run.root / WEIGHTS} do not fit model {run.config.model} "
                      f"as config.json describes it ({type(exc).__name__}); was the run directory "
                      "edited? train the student again") from None
    return student
    return student, cache


def export_run(run: Run, format: str = "auto") -> dict:
    """Export ``run`` as ``format`` (``auto``: the one that fits), checked; returns the
    export record (also written as ``export.json`` in the run directory)."""
    kind = STUDENTS.declared(run.config.model).kind
    fitting = fitting_format(run)
    format = fitting if format == "auto" else format
    if format != fitting:
        raise KdError(f"format={format} does not fit model {run.config.model}, {FORMATS[fitting]} "
                      f"student; export it with format={fitting}")
    _check_installed(format)
    student, cache = restore(run)
    target, record_path = run.root / f"student.{format}", run.root / EXPORT_RECORD
    if format == "hf":  # a folder: the model, its configs and the tokenizer
        atomic = atomic_dir

        def produce(tmp: Path) -> tuple[dict, dict]:
            return write_hf(student, tmp, cache), check_hf(student, tmp, cache, LOGIT_TOLERANCE)
    else:
        atomic = atomic_path
        data = StudentData(cache, run.config.layer)
        rows, labels = data.rows("test", kind), data.labels("test")
        text = kind == "inputs" and data.modality == "text"  # the exported model reads documents
        write, scorer = (_write_onnx, _onnx_scorer) if format == "onnx" else (_write_skops, _skops_scorer)

        def produce(tmp: Path) -> tuple[dict, dict]:
            return write(student, tmp, cache, run, data), _check(student, scorer(tmp, text), rows, labels)
    try:
        with atomic(target) as tmp:  # renamed into place only if everything below passes
            try:
                detail, check = produce(tmp)
            except KdError:
                raise
            except Exception as exc:  # the exporter's, onnxruntime's, skops' or transformers' own failure
                first = first_line(exc)
                raise KdError(f"exporting run {run.root.name} as {format} failed "
                              f"({type(exc).__name__}: {first}); nothing was written") from None
            if not check["ok"]:
                raise KdError(f"the exported {format} model does not reproduce run {run.root.name}: "
                              f"{check['problem']}; nothing was written (please report this)")
            beside = detail.pop("beside", {})  # files written beside the model: name -> text
            if tmp.is_dir():  # a folder: every file's size and sha256
                listed = files(tmp)
                what = {"folder": target.name, "bytes": sum(f["bytes"] for f in listed.values()),
                        "files": listed}
            else:
                what = {"file": target.name, "bytes": tmp.stat().st_size,
                        **({"beside": sorted(beside)} if beside else {}), "sha256": sha256_file(tmp)}
            recorded = "test_perplexity" if format == "hf" else "test_accuracy"
            record = {
                "format": format, **what, **detail,
                "check": {k: v for k, v in check.items() if k not in ("ok", "problem")},
                "run_id": run.row["run_id"], "model": run.config.model,
                "teacher_fingerprint": cache.teacher_fingerprint,
                "dataset_fingerprint": cache.dataset_fingerprint,
                f"recorded_{recorded}": run.row.get(recorded),
            }
            for name, content in beside.items():  # (the featuriser: checked with the model)
                atomic_write_text(run.root / name, content)
            # the record first: a file in place always has its record (its sha256 names it)
            atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    except OSError as exc:
        raise KdError(f"cannot write the export into run {run.root}: {exc.strerror or exc} "
                      f"({exc.filename or run.root}); fix its permissions or free space") from None
    return {**record, "path": str(target)}


def _check_installed(format: str) -> None:
    import importlib

    missing = []
    for module in {"onnx": ("onnx", "onnxscript", "onnxruntime"), "skops": ("skops",),
                   "hf": ("transformers", "safetensors")}[format]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        extra = "text" if format == "hf" else "export"
        raise KdError(f"format={format} needs {', '.join(missing)}, not installed here; "
                      f"pip install 'kdcache[{extra}]'")


# --------------------------------------------------------------------------- onnx

def _write_onnx(student, path: Path, cache: TeacherCache, run: Run, data: StudentData) -> dict:
    """Export the student's deployed network to ``path`` (opset OPSET, dynamic batch) with
    kdcache's metadata; returns what export.json records about it."""
    import contextlib
    import io
    import warnings

    import onnx
    import torch

    shape = tuple(cache.manifest["teacher"]["input_shape"])
    featuriser = _featuriser(student, data)
    batch = torch.export.Dim("batch", min=1)
    if featuriser is None:
        name, example, dynamic = "input", torch.zeros((2, *shape)), {0: batch}
    else:  # hashed ids of real test documents, batch and length dynamic
        name, dynamic = "ids", {0: batch, 1: torch.export.Dim("length", min=1)}
        example = torch.from_numpy(featuriser(data.rows("test", "inputs")[0:2]))
        if example.shape[0] < 2 or example.shape[1] < 3:  # sizes 1 (and a length equal to the
            example = torch.ones((2, 3), dtype=torch.int64)  # batch) would be specialised away
    # batch 2: a batch of 1 would be specialised away. The exporter reports its stages on
    # stdout and warns about what it decomposes: the user is owed kdcache's summary only
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_deployed(student, "deployed_module", "onnx"), (example,), dynamo=True,
                                    opset_version=OPSET, input_names=[name],
                                    output_names=["logits"], dynamic_shapes=(dynamic,))
    model = program.model_proto
    preprocessing = cache.manifest["preprocessing"]
    metadata = {
        "kdcache.preprocessing": json.dumps(preprocessing),
        **({"kdcache.featuriser": json.dumps(featuriser.spec())} if featuriser else {}),
        "kdcache.input_shape": json.dumps(list(shape)),
        "kdcache.classes": json.dumps(student.classes_.tolist()),
        "kdcache.run_id": str(run.row.get("run_id")),
        "kdcache.model": run.config.model,
        "kdcache.teacher_fingerprint": cache.teacher_fingerprint,
        "kdcache.dataset_fingerprint": cache.dataset_fingerprint,
    }
    onnx.helper.set_model_props(model, metadata)
    model.doc_string = (f"kdcache student {run.config.model} from run {run.row.get('run_id')}: "
                        + ("input (x - mean) / std as in kdcache.preprocessing" if featuriser is None
                           else f"input the documents' hashed n-gram ids ({FEATURISER}, "
                                "kdcache.featuriser)") + ", output logits")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    out = {"opset": OPSET, "input": {"name": "input", "dtype": "float32", "shape": ["batch", *shape]},
           "output": {"name": "logits", "dtype": "float32", "shape": ["batch", cache.num_classes]},
           "preprocessing": preprocessing, "metadata_keys": sorted(metadata)}
    if featuriser is not None:
        out["input"] = {"name": "ids", "dtype": "int64", "shape": ["batch", "length"],
                        "what": f"hashed n-gram ids of the documents, made as {FEATURISER} "
                                "says (0 pads)"}
        out["featuriser"] = featuriser.spec()
        out["beside"] = {FEATURISER: json.dumps(featuriser.spec(), indent=2) + "\n"}
    return out


def _featuriser(student: Student, data: StudentData) -> HashedNgrams | None:
    """A text network's featuriser (documents -> the ids its ONNX model takes); None for a
    student of arrays."""
    if data.modality != "text":
        return None
    try:
        return student.featuriser()
    except AttributeError:
        raise KdError(f"student {type(student).__name__} reads text but has no featuriser(), so "
                      "its ONNX model's input cannot be made from documents") from None


def _onnx_scorer(path: Path, text: bool = False):
    """``scores(rows)`` of the ONNX model at ``path``; of documents (``text``) through the
    featuriser its metadata records, as a deployment would replay it."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if text:
        spec = session.get_modelmeta().custom_metadata_map["kdcache.featuriser"]
        featurise = HashedNgrams.from_spec(spec)
        return lambda docs: session.run(["logits"], {"ids": featurise(list(docs))})[0]
    return lambda x: session.run(["logits"], {"input": np.ascontiguousarray(x, np.float32)})[0]


# --------------------------------------------------------------------------- skops

def _write_skops(student, path: Path, cache: TeacherCache, run: Run, data: StudentData) -> dict:
    import skops.io as sio

    pipeline = _deployed(student, "to_sklearn", "skops")
    sio.dump(pipeline, path)
    untrusted = sio.get_untrusted_types(file=path)
    if untrusted:  # kdcache's own bug: users must be able to load it without trusting anything
        raise KdError(f"the skops file would need trusted types {untrusted}; please report this")
    steps = ", ".join(type(step).__name__ for _, step in pipeline.steps)
    if STUDENTS.declared(run.config.model).kind == "inputs":  # a text student: documents in
        what = {"what": "the documents themselves: a list of str (UTF-8 text as stored)",
                "dtype": "str", "shape": ["batch"]}
    else:
        what = {"what": "the teacher's cached features, flattened", "layer": data.layer,
                "dtype": "float32", "shape": ["batch", data.feature_dim],
                "cached_shape": list(data.feature_shape)}
    return {"estimator": f"sklearn.pipeline.Pipeline({steps})", "input": what,
            "classes": student.classes_.tolist(),
            "calibration_temperature": run.row.get("calibration_temperature"),
            "temperature": run.row.get("temperature"),  # logreg_soft: its soft targets' T
            "scores": "decision_function(x): [N, K]; with two classes one margin m per row, "
                      "whose class scores are [-m, m]"}


def _deployed(student: Student, method: str, format: str):
    """The student's deployable form, or a one-line refusal for a student that has none."""
    try:
        return getattr(student, method)()
    except (AttributeError, NotImplementedError):
        raise KdError(f"student {type(student).__name__} has no {method}(), so it cannot be "
                      f"exported as {format}") from None


def _skops_scorer(path: Path, text: bool = False):
    """``scores(rows)`` of the skops file at ``path`` (rows: features, or documents)."""
    import skops.io as sio

    pipeline = sio.load(path)
    if text:
        return lambda docs: _two_columns(pipeline.decision_function(list(docs)))
    return lambda x: _two_columns(pipeline.decision_function(np.ascontiguousarray(x, np.float32)))


def _two_columns(scores: np.ndarray) -> np.ndarray:
    """scikit-learn's binary margin (one column) as kdcache's two class scores."""
    return np.stack([-scores, scores], axis=1) if scores.ndim == 1 else scores


# --------------------------------------------------------------------------- the check

def _check(student, exported, rows, labels: np.ndarray) -> dict:
    """Score every test row with the student and with the exported model: the largest |logit
    difference|, how many predictions agree, and the exported model's test accuracy. The check
    fails on a score that is not finite, or a difference beyond float32 rounding
    (LOGIT_TOLERANCE, relative to the size of the student's logits)."""
    worst, scale, agree, correct = 0.0, 1.0, 0, 0
    for a in range(0, len(rows), BLOCK):
        x = rows[a:a + BLOCK]
        own, theirs = student.decision_function(x), exported(x)
        if theirs.shape != own.shape:
            return {"ok": False, "problem": f"scores shaped {theirs.shape}, expected {own.shape}"}
        if not np.isfinite(theirs).all():
            return {"ok": False, "problem": f"non-finite scores on test rows {a}..{a + len(x) - 1}"}
        worst = max(worst, float(np.abs(own - theirs).max(initial=0.0)))
        scale = max(scale, float(np.abs(own).max(initial=0.0)))
        pred = student.classes_[theirs.argmax(1)]
        agree += int((pred == student.classes_[own.argmax(1)]).sum())
        correct += int((pred == labels[a:a + BLOCK]).sum())
    n = len(rows)
    check = {"rows": n, "max_abs_logit_diff": worst, "predictions_agree": agree,
             "test_accuracy": correct / n if n else None, "ok": True, "problem": ""}
    if worst > LOGIT_TOLERANCE * scale:
        check.update(ok=False, problem=f"max |logit difference| {worst:.3g} on the test split "
                                       f"(tolerance {LOGIT_TOLERANCE * scale:.3g})")
    return check
