"""A language-model student exported as a Hugging Face model directory (``kdcache export``,
``format=hf``: the format the ``lm`` student declares).

:func:`write_hf` fills a folder with what ``save_pretrained`` writes for the trained model —
``config.json`` (``LlamaForCausalLM``; ``vocab_size`` the student's, the cache's
``len(tokenizer)``; the tokenizer's EOS, padding and BOS ids), ``model.safetensors`` (float32;
input and output embeddings tied) and ``generation_config.json`` — and the tokenizer the cache's
data was tokenized with (``tokenizer=DIR``, checked to be the one the cache records), saved
beside it, so that ``AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` load it offline, with no kdcache.

:func:`check_hf` loads that folder back with transformers' Auto classes, as a user would, and
checks it against the trained student:

- the tokenizer it loads is the cache's (same fingerprint: same ids for the same text);
- on every window of the cache's test split, its logits at the real (non-padding) positions
  equal the student's within float32 rounding (``tolerance`` relative to the logits' size; the
  largest |difference| is reported), the next-token predictions at the positions with a target
  agree, and its test perplexity (of the true next tokens) is reported beside the run's;
- ``generate`` (greedy, :data:`NEW_TOKENS` new tokens, stopping at EOS as its generation config
  says) from the first :data:`PROMPTS` test windows' first tokens gives the tokens that greedy
  decoding from the student's own full-window logits gives. Where the two first differ, the
  student's two candidates must tie within the tolerance (the incremental forward of
  ``generate`` rounds differently), else the check fails.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import KdError
from pipeline.io import sha256_file

PROMPTS = 4  # test windows whose first tokens prompt generate()
PROMPT_TOKENS = 8  # at most; at most half a window
NEW_TOKENS = 8  # greedy tokens generated per prompt (fewer where the window is short)
# float32 logits held at once per model while checking (32 MiB): windows per forward =
# CHECK_VALUES // (seq_len · vocab), at least one
CHECK_VALUES = 1 << 23


def write_hf(student, folder: Path, cache) -> dict:
    """The trained ``student`` and the cache's tokenizer, saved into ``folder`` (an empty
    folder); returns what ``export.json`` records about them."""
    from pipeline.hf import _quiet
    from pipeline.students.lm import cache_tokenizer

    to_transformers = getattr(student, "to_transformers", None)
    if to_transformers is None:
        raise KdError(f"student {type(student).__name__} has no to_transformers(tokenizer), so it "
                      "cannot be exported as hf")
    found = cache_tokenizer(cache)
    if found is None:
        named = (cache.manifest["dataset"].get("config") or {}).get("tokenizer") or "(none recorded)"
        raise KdError(f"the tokenizer folder {named} that cache {cache.root}'s data was tokenized with "
                      "is not there; format=hf saves that tokenizer beside the model: restore the "
                      "folder (the tokenizer the cache was built with) and export again")
    tokenizer, record = found
    model = to_transformers(tokenizer)
    with _quiet():
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    config = model.config
    return {"architecture": type(model).__name__, "vocab_size": int(config.vocab_size),
            "tokenizer_ids": len(tokenizer), "max_position_embeddings": int(config.max_position_embeddings),
            "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
            "bos_token_id": config.bos_token_id, "dtype": "float32",
            "tokenizer": {"fingerprint": record["fingerprint"], "add_special_tokens": False},
            "input": {"what": "token ids of the cache's tokenizer, as tokenizer(text, "
                              "add_special_tokens=False) gives them (kdcache adds no special token "
                              "but the EOS ending each document)", "dtype": "int64",
                      "shape": ["batch", "length"]},
            "output": {"what": "logits: position j predicts token j + 1", "dtype": "float32",
                       "shape": ["batch", "length", int(config.vocab_size)]}}


def files(folder: Path) -> dict[str, dict]:
    """``{name: {"bytes", "sha256"}}`` of every file in the exported folder."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.iterdir()) if p.is_file()}


def check_hf(student, folder: Path, cache, tolerance: float) -> dict:
    """The folder loaded back with transformers and compared with ``student`` on ``cache``'s
    test split (see the module's docstring): the figures, with ``ok`` and ``problem``."""
    import torch

    from pipeline.data.tokens import tokenizer_record
    from pipeline.hf import _quiet, _transformers

    transformers = _transformers()
    with _quiet():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=torch.float32).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    want = cache.lm["tokenizer"]["fingerprint"]
    if tokenizer_record(tokenizer, folder)["fingerprint"] != want:
        return _failed("its tokenizer loads as another tokenizer than the cache's (fingerprint "
                       f"{want[:12]})")
    vocab = int(student.vocab_)
    if model.config.vocab_size != student.model_.config.vocab_size:
        return _failed(f"its vocab_size is {model.config.vocab_size}, the student's "
                       f"{student.model_.config.vocab_size}")
    seq_len = int(cache.lm["seq_len"])
    per_call = max(1, min(16, CHECK_VALUES // (seq_len * vocab)))
    worst, scale, agree, positions, windows, nll = 0.0, 1.0, 0, 0, 0, 0.0
    for b in cache.token_batches("test", per_call, shuffle=False):
        ids, real, mask = b.ids.astype(np.int64), b.segments >= 0, b.mask
        own = student.decision_function(ids, real)
        with torch.inference_mode():
            theirs = model(input_ids=torch.from_numpy(ids),
                           attention_mask=torch.from_numpy(real.astype(np.int64))).logits.float().numpy()
        theirs = theirs[..., :vocab]  # (an output layer padded past the tokenizer's ids: as the student scores)
        if theirs.shape != own.shape:
            return _failed(f"logits shaped {theirs.shape}, expected {own.shape}")
        if not np.isfinite(theirs[real]).all():
            return _failed(f"non-finite logits in test windows {windows}..{windows + len(ids) - 1}")
        worst = max(worst, float(np.abs(own[real] - theirs[real]).max(initial=0.0)))
        scale = max(scale, float(np.abs(own[real]).max(initial=0.0)))
        z = torch.from_numpy(theirs[mask]).double()
        nxt = np.zeros_like(ids)
        nxt[:, :-1] = ids[:, 1:]  # position j's target is token j + 1
        nll -= float(torch.log_softmax(z, -1).gather(1, torch.from_numpy(nxt[mask])[:, None]).sum())
        agree += int((theirs[mask].argmax(-1) == own[mask].argmax(-1)).sum())
        positions, windows = positions + int(mask.sum()), windows + len(ids)
    check = {"windows": windows, "positions": positions, "max_abs_logit_diff": worst,
             "predictions_agree": agree, "test_perplexity": float(np.exp(nll / positions)) if positions else None,
             "generate": _check_generate(student, model, cache, seq_len, tolerance * scale),
             "ok": True, "problem": ""}
    if worst > tolerance * scale:
        check.update(ok=False, problem=f"max |logit difference| {worst:.3g} on the test split "
                                       f"(tolerance {tolerance * scale:.3g})")
    elif (g := check["generate"])["same"] + g["near_ties"] < g["prompts"]:
        check.update(ok=False, problem=f"generate() gave other tokens than greedy decoding from the "
                                       f"student's logits on {g['prompts'] - g['same'] - g['near_ties']} "
                                       f"of {g['prompts']} test prompts (first: {g['first_difference']})")
    return check


def _failed(problem: str) -> dict:
    return {"ok": False, "problem": problem}


def _check_generate(student, model, cache, seq_len: int, tolerance: float) -> dict:
    """Greedy ``generate`` of the exported model against greedy decoding from the student's
    own logits (the whole sequence run again at every step), from the first real tokens of the
    first :data:`PROMPTS` test windows."""
    import torch

    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    batch = next(cache.token_batches("test", PROMPTS, shuffle=False))
    out = {"prompts": 0, "new_tokens": 0, "same": 0, "near_ties": 0, "first_difference": None}
    for ids, segments in zip(batch.ids.astype(np.int64), batch.segments):
        lead = int(np.argmin(segments >= 0)) if (segments < 0).any() else seq_len  # real tokens first
        p = max(1, min(PROMPT_TOKENS, seq_len // 2, lead))
        n = min(NEW_TOKENS, seq_len - p)  # within the windows the student was trained on
        prompt = torch.from_numpy(ids[None, :p])
        with torch.inference_mode():
            theirs = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                    max_new_tokens=n, do_sample=False)[0, p:].tolist()
        mine, sequence, verdict = [], ids[:p].tolist(), "same"
        for step in range(n):
            z = student.decision_function(np.asarray([sequence], np.int64))[0, -1]
            token = int(z.argmax())
            if step < len(theirs) and theirs[step] != token:  # the first difference
                tie = z[token] - z[theirs[step]] <= tolerance
                verdict = "near_ties" if tie else "different"
                if not tie and out["first_difference"] is None:
                    out["first_difference"] = (f"prompt {ids[:p].tolist()}: generate {theirs}, "
                                               f"the student's greedy {mine + [token]}...")
                break
            mine.append(token)
            sequence.append(token)
            if token in stops:
                break
        if verdict == "same" and mine != theirs:  # generate stopped or went on where the student did not
            verdict = "different"
            out["first_difference"] = out["first_difference"] or (
                f"prompt {ids[:p].tolist()}: generate {theirs}, the student's greedy {mine}")
        out["prompts"] += 1
        out["new_tokens"] += len(theirs)
        if verdict != "different":
            out[verdict] += 1
    return out
