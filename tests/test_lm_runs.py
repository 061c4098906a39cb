"""``kdcache student model=lm`` end to end: a tiny random Llama teacher (tests/lm_models.py) →
a ``tokens:`` cache → ``lm`` students trained from it through pipeline/runs.py (the windows
streamed from the cache), each a results row with perplexities, agreement and KL, and
``kdcache report`` listing them by perplexity. Checked against direct computations on the
cache's own arrays, not against the code under test."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli

pytest.importorskip("transformers")

QUICK = ["layers=1", "width=32", "heads=2", "epochs=1", "batch_size=16", "device=cpu", "threads=1"]


def build(root, corpus, teacher, *extra):
    """``kdcache cache`` of a tokens: dataset by a causal-LM teacher (seq_len 24, float32, CPU);
    the stage measures the teacher's cost too."""
    from stages import cache as cache_stage

    cache_stage.main([f"dataset=tokens:{corpus}", f"teacher=hf:{teacher}", f"tokenizer={teacher}", "seq_len=24",
                      f"cache={root}", "dtype=float32", "device=cpu", *extra])
    return root


@pytest.fixture(scope="module")
def lm_cache(tmp_path_factory, token_corpus, tiny_llama):
    """A token cache (topk:8, seq_len 24, T = 1) of the tiny Llama over the corpus."""
    return build(tmp_path_factory.mktemp("lmrun") / "cache", token_corpus, tiny_llama, "logits=topk:8",
                 "temperature=1")


def test_lm_students_are_rows_and_the_report_lists_them_by_perplexity(lm_cache, tmp_path, capsys):
    from pipeline.cache import open_cache
    from pipeline.results import read_results, results_dir

    runs = tmp_path / "runs"
    kd = run_cli(capsys, "student", f"cache={lm_cache}", "model=lm", "loss=kd", f"runs_dir={runs}", *QUICK)
    ce = run_cli(capsys, "student", f"cache={lm_cache}", "model=lm", "loss=ce", f"runs_dir={runs}", *QUICK)
    cache = open_cache(lm_cache)
    vocab = cache.lm["vocab_size"]
    for row in (kd, ce):
        assert 1.0 < row["test_perplexity"] < vocab and 1.0 < row["val_perplexity"] < vocab
        assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["teacher_agreement"] <= 1.0
        assert row["kl_teacher_student"] > 0 and row["ece"] is None
        assert row["tokens_per_s"] > 0 and row["teacher_tokens_per_s"] > 0
    # the teacher's perplexity is exp of its mean NLL per target token over the test index
    index = cache.index("test").to_pydict()
    nll = sum(n * t for n, t in zip(index["nll"], index["tokens"]) if t) / sum(index["tokens"])
    assert kd["teacher_test_perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    table = [r for r in read_results(results_dir(lm_cache)).to_pylist() if r["run_dir"].startswith(f"{runs}/")]
    assert sorted(r["loss"] for r in table) == ["ce", "kd"]
    # the row's test perplexity is the saved student's own on the cached test windows
    from pipeline.export import load_fitted, open_run

    student = load_fitted(open_run(kd["run_dir"]), cache)
    again = student.evaluate_cache(cache, "test")
    assert again["perplexity"] == pytest.approx(kd["test_perplexity"], rel=1e-5)
    out = tmp_path / "report"
    report = run_cli(capsys, "report", f"cache={lm_cache}", f"runs_dir={runs}", f"out={out}")
    board = report["leaderboard"]
    assert [b["perplexity"] for b in board] == sorted(b["perplexity"] for b in board)
    text = (out / "leaderboard.md").read_text()
    assert "test perplexity" in text and "Language models" in text
    assert "next-token CE alone" in text  # kd against the ce baseline
    assert isinstance(board[0]["side_by_side"], dict), board[0]["side_by_side"]
    # against the teacher: perplexity, parameters and tokens/s of each student beside the
    # teacher's, as the results rows and the cache's teacher record them
    head = "| experiment | test perplexity | teacher test perplexity | params | teacher params | tokens/s | teacher tokens/s |"
    assert head in text
    lines = text[text.index(head):].splitlines()[2:4]
    for row in (kd, ce):
        cells = next(line for line in lines if line.startswith(f"| lm/{row['loss']} |")).split(" | ")
        assert cells[1:5] == [f"{row['test_perplexity']:.2f}", f"{row['teacher_test_perplexity']:.2f}",
                              f"{row['params']:,}", f"{row['teacher_params']:,}"]
        assert float(cells[5].replace(",", "")) > 0 and float(cells[6].replace(",", "")) > 0
    # the plots are in perplexity (a token cache has no accuracy plots): PNGs that open
    from PIL import Image

    names = sorted(p.rsplit("/", 1)[-1] for p in report["plots"])
    assert names == ["perplexity_vs_params.png", "perplexity_vs_temperature.png",
                     "perplexity_vs_tokens_per_s.png", "students_vs_baseline.png"]
    for p in report["plots"]:
        with Image.open(p) as png:
            assert png.format == "PNG" and png.size[0] > 200


def test_lm_trains_in_memory_flat_in_windows_from_streamed_batches(lm_cache, monkeypatch):
    """fit_cache reads the cache through token_batches only (never a whole split), in batches
    of batch_size windows, and scores val and test the same way."""
    from pipeline.cache import open_cache
    from pipeline.cache.reader import TeacherCache
    from pipeline.students import LMStudent, StudentData

    seen = []
    real = TeacherCache.token_batches

    def spy(self, split, batch_size=16, **kw):
        for b in real(self, split, batch_size, **kw):
            seen.append((split, len(b)))
            yield b

    monkeypatch.setattr(TeacherCache, "token_batches", spy)
    cache = open_cache(lm_cache)
    est = LMStudent(layers=1, width=32, heads=2, epochs=2, batch_size=8, device="cpu", loss="kd").fit_cache(
        StudentData(cache))
    assert max(n for _, n in seen) == 8
    assert sum(n for s, n in seen if s == "train") == 2 * cache.num_rows("train")
    assert len(est.history_) == 2 and est.history_[-1]["tokens"] == cache.manifest["splits"]["val"]["tokens"]


def test_lm_trains_from_a_topk_sample_token_cache(token_corpus, tiny_llama, tmp_path, capsys):
    root = build(tmp_path / "cache", token_corpus, tiny_llama, "logits=topk:4+sample:8", "temperature=1")
    row = run_cli(capsys, "student", f"cache={root}", "model=lm", "loss=kd", f"runs_dir={tmp_path / 'runs'}",
                  *QUICK)
    assert np.isfinite(row["test_perplexity"]) and row["test_perplexity"] < open_cache_vocab(root)
    assert row["kl_teacher_student"] is not None  # the K + tail support is exact in topk+sample


def open_cache_vocab(root) -> int:
    from pipeline.cache import open_cache

    return int(open_cache(root).lm["vocab_size"])


def test_a_changed_tokenizer_is_refused_before_training(token_corpus, tiny_llama, tmp_path, capsys):
    """The student reads and writes text with the tokenizer the cache's data names: another
    one there (other merges, same folder) is refused in one line, exit 2."""
    from stages.cli import main
    from tests.lm_models import corpus_documents, train_tokenizer

    teacher = shutil.copytree(tiny_llama, tmp_path / "teacher")
    root = build(tmp_path / "cache", token_corpus, teacher, "logits=topk:4")
    train_tokenizer([d[::-1] for d in corpus_documents(token_corpus)]).save_pretrained(teacher)
    capsys.readouterr()
    assert main(["student", f"cache={root}", "model=lm", f"runs_dir={tmp_path / 'runs'}", *QUICK]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not the one cache" in err and "a student must share the teacher's tokenizer" in err
    assert len(err.splitlines()) == 1


def cli_json(*argv: str) -> tuple[dict, str]:
    """``kdcache ARGV --json`` in-process (for module fixtures, which have no capsys): its JSON
    summary and what it printed before it."""
    import contextlib
    import io
    import json

    from stages.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main([*argv, "--json"]) == 0
    *printed, summary = out.getvalue().strip().splitlines()
    return json.loads(summary), "\n".join(printed)


@pytest.fixture(scope="module")
def lm_sweep(lm_cache, tmp_path_factory):
    """``kdcache sweep model=lm loss=ce grid.width=16,32`` (one epoch each) on the token cache."""
    runs = tmp_path_factory.mktemp("lmsweep") / "runs"
    quick = [a for a in QUICK if not a.startswith("width=")]
    return cli_json("sweep", f"cache={lm_cache}", "model=lm", "loss=ce", "grid.width=16,32", "seed=0",
                    f"runs_dir={runs}", *quick)


def test_a_sweep_of_lm_students_selects_by_val_perplexity(lm_sweep, lm_cache):
    """A sweep over lm widths ranks its runs by validation perplexity, lowest first (not by
    next-token accuracy), and prints perplexities."""
    from pipeline.results import read_results, results_dir

    summary, printed = lm_sweep
    ids = {r["run_id"] for r in summary["rows"]}
    rows = [r for r in read_results(results_dir(lm_cache)).to_pylist() if r["run_id"] in ids]
    assert sorted(r["width"] for r in rows) == [16, 32]
    lowest = min(rows, key=lambda r: r["val_perplexity"])
    assert summary["selected_by"] == "val_perplexity" and summary["best"]["run_id"] == lowest["run_id"]
    assert "val ppl" in printed and "selected on val (val perplexity, lower is better)" in printed
    assert "test 0." not in printed  # no accuracy where a perplexity is due


def test_lm_export_is_a_model_directory_transformers_loads(lm_sweep, lm_cache, token_corpus, capsys):
    """`kdcache export` of the sweep's selected lm run: a folder that transformers' Auto classes
    load offline (model and tokenizer), whose logits on the cached test windows give the run's
    recorded test perplexity, and whose greedy generate() is the trained student's greedy
    decoding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.cache import open_cache
    from pipeline.export import load_fitted, open_run
    from pipeline.io import sha256_file
    from tests.lm_models import corpus_documents

    best = lm_sweep[0]["best"]
    run_dir = Path(best["run_dir"])
    record = run_cli(capsys, "export", f"run={run_dir}")
    folder = run_dir / "student.hf"
    assert record["format"] == "hf" and Path(record["path"]) == folder
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(record["files"])
    assert all(sha256_file(folder / n) == f["sha256"] for n, f in record["files"].items())
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary folder left
    cache = open_cache(lm_cache)
    teacher_dir = cache.manifest["dataset"]["config"]["tokenizer"]
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    vocab = cache.lm["vocab_size"]
    assert model.config.vocab_size == len(tok) == vocab
    text = corpus_documents(token_corpus)[0]  # the tokenizer the cache's data was tokenized with
    assert tok(text, add_special_tokens=False).input_ids == \
        AutoTokenizer.from_pretrained(teacher_dir)(text, add_special_tokens=False).input_ids
    # test perplexity from the exported model's logits over the cached test windows
    from pipeline.cache import format as fmt

    n = cache.num_rows("test")
    ids = cache.stored(fmt.tokens_key("test", "ids"), 0, n).astype(np.int64)
    real = cache.stored(fmt.tokens_key("test", "segments"), 0, n) >= 0
    mask = cache.stored(fmt.tokens_key("test", "mask"), 0, n).astype(bool)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.from_numpy(ids),
                                       attention_mask=torch.from_numpy(real).long()).logits.double(), -1)
    nll = -logp[:, :-1].gather(2, torch.from_numpy(ids[:, 1:, None])).squeeze(2)[torch.from_numpy(mask[:, :-1])]
    assert math.exp(float(nll.mean())) == pytest.approx(best["test_perplexity"], rel=1e-5)
    assert record["check"]["generate"]["same"] == record["check"]["generate"]["prompts"] > 0
    # generate() greedy = the trained student's own greedy decoding, one token at a time
    student = load_fitted(open_run(run_dir), cache)
    prompt = ids[0, :6].tolist()
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, 6, dtype=torch.long),
                         max_new_tokens=5, do_sample=False)[0, 6:].tolist()
    mine = list(prompt)
    for _ in range(len(out)):
        mine.append(int(student.decision_function(np.asarray([mine]))[0, -1].argmax()))
    assert mine[6:] == out


def test_an_hf_export_that_does_not_reproduce_its_run_leaves_nothing(lm_sweep, capsys, monkeypatch):
    """Weights that drift on the way out (the final norm scaled by 1 %) are caught by the check
    on the cached test windows: exit 2, one line, no student.hf, no export.json."""
    import torch

    from pipeline.students.lm import LMStudent
    from stages.cli import main

    real = LMStudent.to_transformers

    def drifted(self, tokenizer):
        model = real(self, tokenizer)
        with torch.no_grad():
            model.model.norm.weight.mul_(1.01)
        return model

    monkeypatch.setattr(LMStudent, "to_transformers", drifted)
    summary = lm_sweep[0]
    run_dir = Path(next(r["run_dir"] for r in summary["rows"] if r["run_id"] != summary["best"]["run_id"]))
    capsys.readouterr()
    assert main(["export", f"run={run_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not reproduce run" in err and "max |logit difference|" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "log.jsonl", "metrics.json",
                                                         "student.safetensors"]
