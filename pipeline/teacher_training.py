"""Training the teacher of a dataset (``kdcache teacher``, and the first ``kdcache cache`` of a
dataset that has none): augmentation by ``teacher_augment`` (default: a shift of ±1), the best
validation epoch kept, test scored once, saved as ``model.safetensors`` + ``config.json`` +
``metrics.json`` under ``<teacher_dir>/<dataset slug>/<arch>-<key>/``.

The key (:func:`teacher_key`) is a hash of what determines the trained weights: the data (the
dataset's fingerprint, not its file name) and the training settings (:func:`teacher_identity`).
Another dataset, or other settings, get a teacher of their own; a stored teacher whose recorded
dataset fingerprint is not the current one is refused (:func:`stored_teacher`).

Training prints one line per epoch on stderr (a bar on a terminal) and checkpoints every
finished epoch into ``.<arch>-<key>.incomplete/`` beside the teacher's folder, so Ctrl-C and a
re-run of the same command resume from the last finished epoch, to the same final weights as an
uninterrupted run (on the same device).

Text teachers (``teacher=hf:DIR``, :mod:`pipeline.hf`) train their classification head:
``finetune=head`` (the default) runs the frozen encoder once over train, val and test into
features and trains the linear head on them for ``epochs`` (fast on a CPU), and saves only the
head's tensors; ``finetune=full`` trains every weight on batches of text (give it a small
``lr``, e.g. 3e-5) and saves them all. Either file records the fingerprint of the model
directory's encoder and tokenizer, and loads only onto that model (``HfTeacher.load_checkpoint``).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import uuid
from pathlib import Path

import torch
from torch import nn

from pipeline import runtime, training
from pipeline.augment import Policy, parse
from pipeline.config import TeacherConfig, fingerprint
from pipeline.data import Dataset, dataset_slug
from pipeline.errors import KdError, StoppedEarly
from pipeline.io import atomic_path, atomic_write_text, fsync_dir
from pipeline.paths import teacher_slug
from pipeline.provenance import save_config
from pipeline.teachers import (TEACHERS, TEXT_FAMILY, auto_teacher, create_teacher, is_text_teacher,
                                pretrained_state)

CHECKPOINT = "checkpoint.pt"  # in the .incomplete folder: everything needed to resume


def teacher_arch(cfg: TeacherConfig, dataset: Dataset) -> str:
    """The architecture ``cfg.teacher`` names (``auto``: picked by the input's rank). A teacher
    that does not read the dataset's kind of input (text, arrays) is refused in one line."""
    if dataset.modality == "tokens":  # windows of token ids: a causal LM's data
        if is_text_teacher(cfg.teacher):
            return cfg.teacher
        if cfg.teacher == "auto":  # trained by pipeline.lm_teacher, before the data can be opened
            raise KdError(f"teacher=auto on {dataset.spec} is a language model that `kdcache teacher "
                          f"dataset={dataset.spec}` trains; run it, then pass teacher=hf:<its folder>")
        raise KdError(f"teacher {cfg.teacher} reads arrays, but {dataset.spec} holds token windows; "
                      "pass teacher=hf:DIR (a causal language model), or train one: kdcache teacher "
                      f"dataset={dataset.spec}")
    text = dataset.modality == "text"
    if cfg.teacher == "auto":
        if text:
            raise KdError(f"teacher=auto picks array teachers, but {dataset.spec} holds text; pass "
                          "teacher=hf:DIR, a Hugging Face model directory (e.g. all-MiniLM-L6-v2's)")
        return auto_teacher(dataset.input_shape)
    if text and not is_text_teacher(cfg.teacher):
        raise KdError(f"teacher {cfg.teacher} reads arrays, but {dataset.spec} holds text; pass "
                      "teacher=hf:DIR, a Hugging Face model directory")
    if not text and is_text_teacher(cfg.teacher):
        raise KdError(f"teacher {cfg.teacher} reads text, but {dataset.spec} holds arrays shaped "
                      f"{tuple(dataset.input_shape)}; use an array teacher (e.g. teacher=auto), or a "
                      "text dataset (dataset=text:PATH)")
    return cfg.teacher


def teacher_policy(cfg: TeacherConfig, dataset: Dataset) -> Policy | None:
    """``teacher_augment``; ``auto`` is a shift of ±1 for inputs with a channel axis (signals
    (C, L), images (C, H, W)) and none for flat rows, which may be tabular features."""
    spec = cfg.teacher_augment
    if dataset.modality == "text" and spec not in ("auto", "none"):
        raise KdError(f"teacher_augment={spec} augments arrays, and {dataset.spec} holds text; a text "
                      "teacher trains on the documents as they are: drop teacher_augment=")
    if spec == "auto":
        spec = "shift:1" if len(dataset.input_shape) >= 2 else "none"
    return parse(spec, dataset.input_shape, key="teacher_augment")


def teacher_identity(cfg: TeacherConfig, dataset: Dataset) -> dict:
    """What determines the weights a training run produces, and so where they are stored.

    In it: the dataset fingerprint (the file's path and bytes, labels, splits, and so seed and
    val_fraction where val is carved, and the preprocessing), the architecture (and a plugin
    teacher's package version), and the training settings of :class:`TeacherConfig` that change
    the weights: seed, pretrained, epochs, lr, weight_decay, batch_size and teacher_augment
    (``auto`` resolved, so ``auto`` and the policy it stands for are one teacher).
    Not in it: ``device`` (where it trained, not what it learnt; a checkpoint resumes only on
    the device type it was made on), ``teacher_dir``, ``teacher_ckpt``, and how the data is
    found and read (``data_root``, ``download``, ``decoders``), which the fingerprint covers
    by what was read.
    """
    arch = teacher_arch(cfg, dataset)
    policy = teacher_policy(cfg, dataset)
    if is_text_teacher(arch):
        return _text_identity(cfg, dataset, arch)
    return {"dataset_fingerprint": dataset.fingerprint, "arch": arch,
            "arch_plugin": TEACHERS.identity(arch) if arch in TEACHERS else None,
            "seed": cfg.seed, "pretrained": cfg.pretrained, "epochs": cfg.epochs, "lr": cfg.lr,
            "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
            "teacher_augment": policy.spec if policy is not None else "none"}


_TEXT_MODELS: dict[tuple, dict] = {}  # a model directory's fingerprints, by its files' stamps


def _text_identity(cfg: TeacherConfig, dataset: Dataset, arch: str) -> dict:
    """:func:`teacher_identity` of a text teacher: the model by what it is, not where it is
    (its encoder weights and tokenizer, :attr:`pipeline.hf.HfTeacher.base_fingerprint`; the
    tokenizer fingerprint, max_length included), transformers' version, and ``finetune`` with
    the training settings. Loading a model to fingerprint it takes a while, so each directory
    is fingerprinted once per process (again when one of its files changes)."""
    import importlib.metadata

    from pipeline.hf import resolve_model

    directory = resolve_model(arch.partition(":")[2])
    stamps = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                   for p in sorted(directory.iterdir()) if p.is_file())
    key = (str(directory), stamps, cfg.max_length, dataset.num_classes)
    if key not in _TEXT_MODELS:
        model = create_teacher(arch, dataset.input_shape, dataset.num_classes, max_length=cfg.max_length)
        _TEXT_MODELS[key] = {"base": model.base_fingerprint, "tokenizer": model.tokenizer_fingerprint}
    return {"dataset_fingerprint": dataset.fingerprint, "arch": TEXT_FAMILY,
            "model": _TEXT_MODELS[key], "transformers": importlib.metadata.version("transformers"),
            "finetune": cfg.finetune, "max_length": cfg.max_length, "seed": cfg.seed,
            "epochs": cfg.epochs, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
            "batch_size": cfg.batch_size, "teacher_augment": "none"}


def teacher_key(cfg: TeacherConfig, dataset: Dataset) -> str:
    """sha256 of :func:`teacher_identity`: the teacher's name in the store."""
    return fingerprint(teacher_identity(cfg, dataset))


def teacher_dir(cfg: TeacherConfig, dataset: Dataset) -> Path:
    """Where the trained default teacher of this data, architecture and training settings lives:
    ``<teacher_dir>/<dataset slug>/<arch>-<first 12 hex of its key>`` (the slug and arch keep
    it readable; the key keeps two files named alike, or two settings, apart)."""
    arch = teacher_slug(teacher_arch(cfg, dataset))  # hf:DIR by its directory's name
    return Path(cfg.teacher_dir) / dataset_slug(dataset.spec) / f"{arch}-{teacher_key(cfg, dataset)[:12]}"


def incomplete_dir(cfg: TeacherConfig, dataset: Dataset) -> Path:
    """The private folder of a training run in progress, beside its final folder: the
    checkpoint of its last finished epoch. Removed once the teacher is saved."""
    out = teacher_dir(cfg, dataset)
    return out.parent / f".{out.name}.incomplete"


def default_checkpoint(cfg: TeacherConfig, dataset: Dataset) -> Path:
    return teacher_dir(cfg, dataset) / "model.safetensors"


def stored_teacher(cfg: TeacherConfig, dataset: Dataset) -> Path | None:
    """The stored teacher's weights for this data and settings, or None when none is stored.
    Refuses one whose recorded dataset fingerprint is not this dataset's (a folder copied or
    edited by hand): it would silently score other data."""
    folder = teacher_dir(cfg, dataset)
    ckpt = folder / "model.safetensors"
    if not ckpt.is_file():
        return None
    try:
        recorded = json.loads((folder / "metrics.json").read_text()).get("dataset_fingerprint")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded != dataset.fingerprint:
        what = (f"dataset fingerprint {str(recorded)[:12]}, this data's is {dataset.fingerprint[:12]}"
                if recorded else "its metrics.json records no dataset fingerprint")
        raise KdError(f"stored teacher {folder} was trained on other data ({what}); delete {folder} "
                      f"to train one on {dataset.spec}, or pass teacher_ckpt=PATH")
    return ckpt


def save_checkpoint(folder: Path, state: dict) -> None:
    """Write the state of a finished epoch atomically (a Ctrl-C while writing leaves the
    previous epoch's checkpoint). Tensors, numbers, strings and plain containers only: it
    loads with ``weights_only=True``, which never unpickles code."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / CHECKPOINT) as tmp:
        torch.save(state, tmp)


def load_checkpoint(folder: Path, identity: dict, device: torch.device, quiet: bool = False) -> dict | None:
    """The checkpoint of a run of exactly this identity on this device type, else None (with a
    note on stderr, unless ``quiet``, when one is there but cannot be used: the run starts over)."""
    path = folder / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        ours = state["identity"] == identity and state["device"] == device.type
    except Exception as exc:  # written atomically, so only a damaged disk gets here
        if not quiet:
            print(f"kdcache: the teacher checkpoint {path} cannot be read ({type(exc).__name__}); "
                  "training from the first epoch", file=sys.stderr)
        return None
    if not ours:  # the folder name holds 12 hex of the key, and the device is not in it
        if not quiet:
            print(f"kdcache: the teacher checkpoint {path} is of another run (other settings, or "
                  f"device {state['device']}); training from the first epoch", file=sys.stderr)
        return None
    return state


def train_teacher(cfg: TeacherConfig, dataset: Dataset, progress: bool = True) -> dict:
    """Train, score once on test, and save the teacher atomically. Returns its metrics.

    Resumes from the checkpoint of an interrupted run with the same identity; Ctrl-C raises
    :class:`StoppedEarly`, whose message says which epoch the next run resumes after."""
    with runtime.torch_threads(cfg.threads):  # here: torch runs in this thread
        return _train_teacher(cfg, dataset, progress)


def _train_teacher(cfg: TeacherConfig, dataset: Dataset, progress: bool) -> dict:
    arch = teacher_arch(cfg, dataset)
    if is_text_teacher(arch):
        return _train_text_teacher(cfg, dataset, arch, progress)
    device = runtime.pick_device(cfg.device)
    identity = teacher_identity(cfg, dataset)
    torch.manual_seed(cfg.seed)
    model = create_teacher(arch, dataset.input_shape, dataset.num_classes)
    if cfg.pretrained:
        state = pretrained_state(arch, dataset.input_shape, dataset.num_classes)
        own = model.state_dict()
        # the classifier head rarely matches num_classes; keep every tensor that fits
        model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape},
                              strict=False)

    # Teacher training holds train and val in memory; caching (stage one) is what streams.
    x = {s: dataset.inputs(s, 0, len(dataset.splits[s])) for s in ("train", "val", "test")}
    return _fit_and_save(cfg, dataset, arch, model, x, device, identity, teacher_policy(cfg, dataset),
                         progress)


def _fit_and_save(cfg: TeacherConfig, dataset: Dataset, label: str, model: nn.Module, x: dict,
                  device: torch.device, identity: dict, policy: Policy | None, progress: bool,
                  weights=None, params: int | None = None) -> dict:
    """Train ``model`` on ``x`` (arrays by split) with the splits' labels, resuming from the
    checkpoint of an interrupted run of this identity; score test once and save. ``weights()``
    gives what is saved (tensors, safetensors metadata; default: the model's state dict)."""
    work = incomplete_dir(cfg, dataset)
    y = {s: dataset.splits[s].labels for s in ("train", "val", "test")}
    resume = load_checkpoint(work, identity, device)
    if resume:
        print(f"resuming teacher training after epoch {resume['epoch']}/{cfg.epochs} ({work})",
              file=sys.stderr)
    lines = progress and not sys.stderr.isatty()  # on a terminal, fit's bar says the same
    started, first = time.perf_counter(), resume["epoch"] if resume else 0

    def on_epoch(state: dict) -> None:
        save_checkpoint(work, {**state, "identity": identity, "device": device.type})
        if lines:
            print(_epoch_line(label, state, cfg.epochs, time.perf_counter() - started,
                              state["epoch"] - first), file=sys.stderr)

    ce = nn.CrossEntropyLoss()
    batches = training.array_batches(x["train"], y["train"], cfg.batch_size, cfg.seed)
    try:
        result = training.fit(model, batches, -(-len(y["train"]) // cfg.batch_size), x["val"], y["val"],
                              lambda out, labels, targets: ce(out, labels),
                              epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
                              seed=cfg.seed, device=device,
                              augment=policy, progress=progress,
                              desc=f"teacher {label}", resume=resume, on_epoch=on_epoch)
        summary = _score_and_save(cfg, dataset, model, result, x["test"], y["test"], device, identity,
                                  weights() if weights else None, params)
    except KeyboardInterrupt:
        # what the next run resumes from is what is on disk (Ctrl-C may land during a save)
        saved = load_checkpoint(work, identity, device, quiet=True)
        if saved:
            raise StoppedEarly(f"teacher training stopped after epoch {saved['epoch']}/{cfg.epochs}; "
                               "re-run the same command to resume from there") from None
        raise StoppedEarly(f"teacher training stopped in epoch 1/{cfg.epochs}, before any epoch "
                           "finished; re-run the same command to start it again") from None
    shutil.rmtree(work, ignore_errors=True)  # the teacher is saved: nothing left to resume
    return summary


def _score_and_save(cfg: TeacherConfig, dataset: Dataset, model: nn.Module, result: training.FitResult,
                    x_test, y_test, device: torch.device, identity: dict,
                    weights: tuple[dict, dict] | None = None, params: int | None = None) -> dict:
    """Score the trained teacher once on test and save it (weights, config, metrics) into its
    folder atomically: a temporary folder beside it, renamed into place when whole.
    ``weights``: the (tensors, safetensors metadata) to save, where not the model's state dict;
    ``params``: the teacher's parameters, where ``model`` is only the part that was trained."""
    test_logits = training.predict_logits(model, x_test, device)
    test_acc = float((test_logits.argmax(1) == y_test).mean())  # scored once
    metrics = {"arch": teacher_arch(cfg, dataset), "dataset": dataset.spec,
               "dataset_fingerprint": dataset.fingerprint, "key": fingerprint(identity),
               "params": params or sum(p.numel() for p in model.parameters()),
               "best_epoch": result.best_epoch, "val_accuracy": result.best_val_accuracy,
               "test_accuracy": test_acc, "fit_seconds": round(result.seconds, 2),
               "history": result.history}

    out = teacher_dir(cfg, dataset)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        from safetensors.torch import save_file

        state, meta = weights or ({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                                  None)
        save_file(state, str(tmp / "model.safetensors"), metadata=meta)
        save_config(cfg, tmp / "config.json")
        # the config records what it was trained on too (a folder is readable on its own)
        config = json.loads((tmp / "config.json").read_text())
        config.update(dataset_fingerprint=dataset.fingerprint, key=metrics["key"])
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        atomic_write_text(tmp / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**{k: v for k, v in metrics.items() if k != "history"},
            "checkpoint": str(out / "model.safetensors")}


def _train_text_teacher(cfg: TeacherConfig, dataset: Dataset, arch: str, progress: bool) -> dict:
    """A text teacher's head (``finetune=head``: on features the frozen encoder computes once)
    or every weight (``finetune=full``: on batches of text), through the shared loop."""
    from pipeline.hf import HEAD_LAYER, TokenRows, run_bucketed

    device = runtime.pick_device(cfg.device)
    identity = teacher_identity(cfg, dataset)
    torch.manual_seed(cfg.seed)  # the head's initial weights
    teacher = create_teacher(arch, dataset.input_shape, dataset.num_classes, max_length=cfg.max_length)
    texts = {s: dataset.texts(s) for s in ("train", "val", "test")}
    if cfg.finetune == "head":
        teacher.to(device)
        # the encoder is frozen: its features are computed once, and the head trains on them
        x = {s: run_bucketed(teacher, t, cfg.batch_size, device, layer=HEAD_LAYER) for s, t in texts.items()}
        trained: nn.Module = teacher.head
    else:
        x = {s: TokenRows.pack(teacher, t) for s, t in texts.items()}
        trained = TokenRows(teacher)
    label = f"{TEXT_FAMILY}:{Path(arch.partition(':')[2]).name}"  # progress lines: the model's name
    return _fit_and_save(cfg, dataset, label, trained, x, device, identity, None, progress,
                         weights=lambda: teacher.checkpoint(cfg.finetune),
                         params=sum(p.numel() for p in teacher.parameters()))


def _epoch_line(arch: str, state: dict, epochs: int, elapsed: float, epochs_now: int) -> str:
    """``teacher mlp: epoch 3/40  loss 0.4123  val 0.9120  best 0.9200 (epoch 2)  elapsed 0:12
    eta 2:28``: the ETA from this run's epochs so far (a resumed run's are timed afresh)."""
    last = state["history"][-1]
    eta = elapsed / max(1, epochs_now) * (epochs - state["epoch"])
    return (f"teacher {arch}: epoch {state['epoch']}/{epochs}  loss {last['train_loss']:.4f}  "
            f"val {last['val_accuracy']:.4f}  best {state['best_val_accuracy']:.4f} "
            f"(epoch {state['best_epoch'] + 1})  elapsed {_clock(elapsed)}  eta {_clock(eta)}")


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
