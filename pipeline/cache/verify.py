"""Re-checking a cache end to end (``kdcache verify``):

1. every shard's stored bytes against the sha256 recorded when it was written (and every
   chunk's CRC32C on the way);
2. every split's Parquet index against its recorded sha256;
3. the dataset on disk against the dataset fingerprint;
4. multi-view caches: every stored augmentation parameter against the one drawn again from
   (seed, split, sample_id, view);
5. the teacher: its weights against the teacher fingerprint, then a fresh forward pass on a
   seeded sample of (row, view) pairs, each input rebuilt by replaying the view's stored
   parameters, compared with the cached logits within the dtype's tolerance. Sparse caches:
   topk's classes must be a fresh top-K (up to ties within tolerance), with their logits and
   tail within tolerance; sample's classes must have fresh probability, and drawing again
   from the fresh teacher with the same keyed uniforms must give the same classes.

A text cache (``teacher=hf:DIR``): the teacher's tokenizer must be the one recorded (else the
check names what differs, e.g. ``max_length 128 vs 64``); every document is tokenized again
and its token ids' sha256 checked against every shard's and split's recorded one; and the
sampled rows are re-run one by one, each tokenized alone and padded nowhere, so a cached
value that depended on its batch's padding (length bucketing gone wrong) fails too.

A token cache (a causal-LM teacher on a token dataset): the teacher's tokenizer must be the
one recorded, and its weights; every window is rebuilt from the documents (tokenized again by
the dataset) and must hold the stored ids, mask and segments, each shard's ids hashing to its
recorded inputs sha256; and a seeded sample of windows is re-run through the teacher one
window at a time, every real position's stored top-K (or draws, or dense logits) checked
against the fresh logits within the dtype's tolerance.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import torch

from pipeline import runtime, storage, tokens
from pipeline.augment import parse
from pipeline.cache import format as fmt
from pipeline.cache.reader import TeacherCache
from pipeline.cache.shard import view_params
from pipeline.data import positions_of
from pipeline.errors import KdError
from pipeline.hf import HfTeacher, tokenizer_difference
from pipeline.hf_lm import HfCausalLM
from pipeline.sparse import SAMPLE, draw, draw_tail, encode_topk, sample_uniforms
from pipeline.teachers import TeacherSpec, build_teacher, state_fingerprint, tap

TOLERANCE = {"float16": (2e-3, 2e-2), "float32": (1e-4, 1e-4)}  # (rtol, atol) vs a fresh forward
# sample:K: a drawn class the fresh teacher gives less probability than this was not drawn by it
MIN_DRAWN_PROB = 1e-9
SAME_DRAWS = 0.99  # of the drawn classes, re-drawn identically (boundaries of the CDF may move)


def verify(cache: TeacherCache, rows: int, seed: int, device: str = "cpu") -> dict[str, str]:
    """Every check's verdict: ``"ok ..."`` or ``"FAILED: ..."``. The teacher runs on ``device``
    as a build does there (mixed precision on CUDA), so a cache built on a GPU is checked
    against the same arithmetic."""
    m = cache.manifest
    checks: dict[str, str] = {}

    bad = damaged_shards(cache)
    listed = [f"{key} shard {shard}" for (_, shard), keys in bad.items() for key in keys]
    checks["shard checksums"] = "ok" if not bad else (
        f"FAILED: {', '.join(listed[:5])}{f' and {len(listed) - 5} more' if len(listed) > 5 else ''}")
    bad_indexes = damaged_indexes(cache)
    checks["index checksums"] = "ok" if not bad_indexes else f"FAILED: {', '.join(bad_indexes)}"

    try:
        dataset = cache.open_dataset()
        checks["dataset fingerprint"] = "ok"
    except KdError as exc:
        dataset = None
        checks["dataset fingerprint"] = f"FAILED: {exc}"

    policy = None
    if dataset is not None and cache.views("train") > 1:
        checks["augmentation parameters"] = _reading(lambda: _augmentation(cache, dataset))
        policy = parse(cache.augment["policy"], dataset.input_shape)

    t = m["teacher"]
    spec = TeacherSpec.of_record(t, layers=tuple(m["layers"]), pool=m["pool"])
    if fmt.is_token_cache(m):
        return {**checks, **_verify_tokens(cache, dataset, spec, rows, seed, device)}
    try:
        built = _text_teacher(m, spec) if "tokenizer" in m else build_teacher(spec)
        model = tap(built, spec.layers, spec.pool, spec.arch).to(runtime.pick_device(device)).eval()
        checks["teacher fingerprint"] = "ok"
    except KdError as exc:
        model = None
        checks["teacher fingerprint"] = f"FAILED: {exc}"

    if isinstance(model, HfTeacher) and dataset is not None:
        checks["token ids"] = _reading(lambda: _token_ids(cache, dataset, model))
    if model is not None and dataset is not None and rows:
        checks["teacher fidelity"] = _reading(
            lambda: _fidelity(cache, dataset, model, policy, rows, seed, device))
    return checks


def _text_teacher(m: dict, spec: TeacherSpec) -> HfTeacher:
    """The text teacher a cache records, refused in one line when it now tokenizes otherwise
    (naming what differs) or its weights differ from those the cache was built with."""
    model = build_teacher(dataclasses.replace(spec, fingerprint=""))
    arch = m["teacher"]["arch"]
    differ = tokenizer_difference(m["tokenizer"], model.tokenizer_record)
    if differ:
        raise KdError(f"teacher {arch} now tokenizes differently from the cache ({differ}); restore "
                      "its tokenizer, or build a new cache with this one")
    actual = state_fingerprint(model, spec.arch, spec.input_shape, spec.num_classes)
    if actual != spec.fingerprint:
        raise KdError(f"teacher {arch} with {spec.ckpt} is not the teacher the cache was built with "
                      f"(fingerprint {actual[:12]} != {spec.fingerprint[:12]}); restore its weights, "
                      "or build a new cache")
    return model


def _verify_tokens(cache: TeacherCache, dataset, spec: TeacherSpec, rows: int, seed: int,
                   device: str) -> dict[str, str]:
    """The teacher, window and fidelity checks of a token cache (see the module's docstring)."""
    checks = {}
    try:
        model = _text_teacher(cache.manifest, spec).to(runtime.pick_device(device)).eval()
        checks["teacher fingerprint"] = "ok"
    except KdError as exc:
        model = None
        checks["teacher fingerprint"] = f"FAILED: {exc}"
    if dataset is not None:
        checks["token windows"] = _reading(lambda: _token_windows(cache, dataset))
    if model is not None and dataset is not None and rows:
        checks["teacher fidelity"] = _reading(lambda: _lm_fidelity(cache, dataset, model, rows, seed, device))
    return checks


def _windows_at(dataset, split: str, positions: np.ndarray) -> dict[str, np.ndarray]:
    """The dataset's windows at these positions (one read when they are a run)."""
    positions = np.asarray(positions, np.int64)
    if hasattr(dataset, "windows_at"):
        return dataset.windows_at(split, positions)
    if len(positions) and np.array_equal(positions, np.arange(positions[0], positions[0] + len(positions))):
        return dataset.windows(split, int(positions[0]), int(positions[0]) + len(positions))
    parts = [dataset.windows(split, int(p), int(p) + 1) for p in positions]
    return {k: np.concatenate([w[k] for w in parts]) for k in ("ids", "mask", "segments")}


def _token_windows(cache: TeacherCache, dataset) -> str:
    """Every window rebuilt from the documents, shard by shard, against the stored ids, mask
    and segments and the shard's recorded inputs sha256."""
    differ, total = [], 0
    for split, records in cache.manifest["shards"].items():
        positions = positions_of(dataset.splits[split].sample_ids, cache.sample_ids(split))
        for rec in records:
            a, b = rec["start"], rec["stop"]
            w = _windows_at(dataset, split, positions[a:b])
            ids = np.ascontiguousarray(w["ids"], np.int64)
            same = (hashlib.sha256(ids.tobytes()).hexdigest() == rec["inputs_sha256"]
                    and np.array_equal(cache.stored(fmt.tokens_key(split, "ids"), a, b), ids)
                    and np.array_equal(cache.stored(fmt.tokens_key(split, "mask"), a, b), np.asarray(w["mask"], np.uint8))
                    and np.array_equal(cache.stored(fmt.tokens_key(split, "segments"), a, b), w["segments"]))
            total += b - a
            if not same:
                differ.append(f"{split} shard {rec['shard']}")
    if differ:
        return (f"FAILED: the documents make other windows than the cache's in {', '.join(differ[:5])}"
                f"{' and more' if len(differ) > 5 else ''} (another tokenizer or tokenizers version, or "
                "edited data?); build a new cache")
    return f"ok ({total:,} windows re-tokenized: the same ids, mask and segments)"


def _lm_fidelity(cache: TeacherCache, dataset, model: HfCausalLM, rows: int, seed: int, device: str) -> str:
    """A seeded sample of windows re-run through the teacher alone, every real position's
    stored outputs against the fresh logits."""
    m = cache.manifest
    rtol, atol = TOLERANCE[m["dtype"]]
    rng = np.random.default_rng(seed)
    sizes = {split: cache.num_rows(split) for split in cache.splits}
    on = runtime.pick_device(device)
    mode = cache.logits_mode
    temperature = float(m["logits"].get("temperature", m["temperature"]))
    worst, checked, positions_checked = 0.0, 0, 0
    draws = {"same": 0, "all": 0, "unlikely": 0}

    def off(a, b):  # distance in tolerances
        return float((np.abs(a - b) / (atol + rtol * np.abs(a))).max(initial=0.0))

    for split, k in apportion(rows, sizes).items():
        where = positions_of(dataset.splits[split].sample_ids, cache.sample_ids(split))
        for row in np.sort(rng.choice(sizes[split], size=k, replace=False)):
            batch = next(cache.token_batches(split, 1, shuffle=False, rows=slice(int(row), int(row) + 1)))
            # the window's documents tokenized afresh, alone: the ids must be the stored ones
            w = (dataset.retokenized(split, where[[row]]) if hasattr(dataset, "retokenized")
                 else _windows_at(dataset, split, where[[row]]))
            if not np.array_equal(np.asarray(w["ids"], np.int64), batch.ids):
                return (f"FAILED: {split} window {int(row)}'s documents tokenize to other ids than the "
                        "cache's (another tokenizer or tokenizers version?); build a new cache")
            real = np.asarray(w["segments"])[0] >= 0
            ids = torch.from_numpy(np.asarray(w["ids"], np.int64))
            with torch.inference_mode(), runtime.autocast(on, runtime.text_autocast_dtype(on)):
                fresh = model(runtime.to_device(ids, on),
                              runtime.to_device(torch.from_numpy(real[None].astype(np.int64)), on))
            fresh = fresh.float().cpu().numpy()[0][real]
            at = np.flatnonzero(real)
            if mode.has_topk:
                cids, values, tail = batch.classes[0][at], batch.values[0][at], batch.tail[0][at]
                _, fresh_values, fresh_tail = encode_topk(fresh, mode.k, cache.num_classes, temperature)
                listed = np.take_along_axis(fresh, cids, axis=1)
                kth = fresh_values[:, -1:]
                worst = max(worst, off(listed, values), off(fresh_tail, tail),
                            off(kth, np.minimum(listed.min(axis=1, keepdims=True), kth)))
                if (np.diff(values, axis=1) > 0).any() or any(len(set(r.tolist())) < len(r) for r in cids):
                    worst = np.inf  # a class listed twice, or out of order
            if mode.has_draws:
                sample_id = cache.sample_ids(split)[[row]]
                uniforms = sample_uniforms(int(m["logits"]["seed"]), split, np.repeat(sample_id, len(at)), at,
                                           mode.draws)
                u = fresh.astype(np.float64) / temperature
                if mode.has_topk:  # re-drawn from the tail the stored top K leave
                    head, cids = batch.classes[0][at], batch.draws[0][at]
                    again = draw_tail(fresh, head, temperature, uniforms, cache.num_classes)
                    np.put_along_axis(u, head, -np.inf, axis=1)
                else:
                    cids = batch.classes[0][at]
                    again = draw(fresh, temperature, uniforms, cache.num_classes)
                p = np.exp(u - u.max(axis=1, keepdims=True))
                p /= p.sum(axis=1, keepdims=True)
                for r in range(len(at)):
                    draws["same"] += int(np.minimum(np.bincount(again[r], minlength=cache.num_classes),
                                                    np.bincount(cids[r], minlength=cache.num_classes)).sum())
                draws["unlikely"] += int((np.take_along_axis(p, cids, axis=1) < MIN_DRAWN_PROB).sum())
                draws["all"] += cids.size
            if not mode.sparse:
                worst = max(worst, off(fresh, batch.logits[0][at]))
            checked += 1
            positions_checked += len(at)
    if mode.has_topk and worst > 1.0:
        return (f"FAILED: cached top-k ids, logits and tail differ from a fresh forward pass "
                f"({worst:.1f}x the {m['dtype']} tolerance)")
    if mode.has_draws:
        same = draws["same"] / max(1, draws["all"])
        head = f"top-k ids, logits and tail within {worst:.2f} of tolerance; " if mode.has_topk else ""
        return (f"ok ({checked} windows, {positions_checked:,} positions: {head}{same:.2%} of "
                f"{draws['all']:,} draws re-drawn identically from a fresh forward pass)"
                if same >= SAME_DRAWS and not draws["unlikely"] else
                f"FAILED: {draws['unlikely']} cached draws are of tokens a fresh forward pass gives "
                f"< {MIN_DRAWN_PROB:g}, and {same:.1%} re-draw identically (need {SAME_DRAWS:.0%})")
    what = "top-k ids, logits and tail" if mode.has_topk else "logits"
    return (f"ok ({checked} windows, {positions_checked:,} positions: {what} within {worst:.2f} of tolerance)"
            if worst <= 1.0 else
            f"FAILED: cached {what} differ from a fresh forward pass ({worst:.1f}x the {m['dtype']} tolerance)")


def _token_ids(cache: TeacherCache, dataset, model: HfTeacher) -> str:
    """Every document tokenized again, shard by shard: each shard's token ids against its
    recorded inputs sha256, each split's against the manifest's."""
    m = cache.manifest
    differ, total = [], 0
    for split, records in m["shards"].items():
        whole = hashlib.sha256()
        positions = positions_of(dataset.splits[split].sample_ids, cache.sample_ids(split))
        for rec in records:
            ids, _ = model.tokenize(dataset.inputs_at(split, positions[rec["start"]:rec["stop"]]))
            part = hashlib.sha256()
            tokens.update_hash(part, ids)
            tokens.update_hash(whole, ids)
            total += len(ids)
            if part.hexdigest() != rec["inputs_sha256"]:
                differ.append(f"{split} shard {rec['shard']}")
        if whole.hexdigest() != m["tokens"][split]["sha256"] and not any(d.startswith(split) for d in differ):
            differ.append(f"{split} (its split hash)")
    if differ:
        return (f"FAILED: the documents tokenize to other ids than the cache's in {', '.join(differ[:5])}"
                f"{' and more' if len(differ) > 5 else ''} (another version of the tokenizers library, or "
                "edited data?); build a new cache")
    return f"ok ({total:,} rows re-tokenized: the same token ids)"


def _fidelity(cache: TeacherCache, dataset, model, policy, rows: int, seed: int, device: str) -> str:
    """The teacher re-run on a seeded sample of (row, view) pairs, against the cached outputs."""
    m = cache.manifest
    rtol, atol = TOLERANCE[m["dtype"]]
    rng = np.random.default_rng(seed)
    worst, checked = 0.0, 0
    sizes = {split: cache.num_rows(split) for split in cache.splits}
    on = runtime.pick_device(device)
    mode = cache.logits_mode
    draws = {"same": 0, "all": 0, "unlikely": 0}
    for split, k in apportion(rows, sizes).items():
        # cached row r is the sample the index names, wherever the dataset holds it
        positions = positions_of(dataset.splits[split].sample_ids, cache.sample_ids(split))
        for row in np.sort(rng.choice(sizes[split], size=k, replace=False)):
            view = int(rng.integers(cache.views(split))) if cache.views(split) > 1 else 0
            if isinstance(model, HfTeacher):  # the row tokenized alone: padded nowhere
                batch = model.encode(dataset.inputs_at(split, positions[[row]]))
                args = [runtime.to_device(torch.from_numpy(batch[k]), on) for k in ("input_ids", "attention_mask")]
                with torch.inference_mode(), runtime.autocast(on, runtime.text_autocast_dtype(on)):
                    fresh = model(*args)[0].float().cpu().numpy()[0]
            else:
                x = runtime.to_device(torch.from_numpy(dataset.inputs_at(split, positions[[row]])), on)
                if view:  # rebuild the input the teacher saw from the stored parameters
                    params = cache.augment_params(split, slice(int(row), int(row) + 1))[:, view]
                    x = policy.apply(x, params.astype(np.int64))
                with torch.inference_mode(), runtime.autocast(on):
                    fresh = model(x)[0].float().cpu().numpy()[0]
            at_row = slice(int(row), int(row) + 1)

            def off(a, b):  # distance in tolerances
                return float((np.abs(a - b) / (atol + rtol * np.abs(a))).max(initial=0.0))

            if mode.has_topk:
                stored = cache.sparse_logits(split, view, rows=at_row)
                ids, values, tail = stored.classes[0], stored.values[0], stored.tail[0]
                _, fresh_values, fresh_tail = encode_topk(fresh[None], mode.k, cache.num_classes,
                                                          float(m["logits"]["temperature"]))
                # a listed class must be a fresh top-K one: its fresh logit at least the K-th
                # largest (near-ties, within tolerance, may be listed either way)
                kth = fresh_values[0, -1:]
                lowest_listed = np.minimum(fresh[ids].min(keepdims=True), kth)
                worst = max(worst, off(fresh[ids], values), off(fresh_tail, tail),
                            off(kth, lowest_listed))
                if len(set(ids.tolist())) < len(ids) or (np.diff(values) > 0).any():
                    worst = max(worst, np.inf)  # a class listed twice, or out of order
            if mode.has_draws:
                entry = m["logits"]
                stored = cache.sparse_logits(split, view, rows=at_row)
                ids = stored.classes[0] if mode.kind == SAMPLE else stored.draws[0]
                uniforms = sample_uniforms(int(entry["seed"]), split,
                                           cache.sample_ids(split)[at_row], view, mode.draws)
                u = fresh.astype(np.float64) / float(entry["temperature"])
                if mode.has_topk:  # re-drawn from the tail the stored top K leave
                    again = draw_tail(fresh[None], stored.classes, float(entry["temperature"]),
                                      uniforms, cache.num_classes)[0]
                    u[stored.classes[0]] = -np.inf
                else:
                    again = draw(fresh[None], float(entry["temperature"]), uniforms, cache.num_classes)[0]
                p = np.exp(u - u.max())
                p /= p.sum()
                # as multisets: a moved cdf boundary changes one draw, not the rest
                draws["same"] += int(np.minimum(np.bincount(again, minlength=cache.num_classes),
                                                np.bincount(ids, minlength=cache.num_classes)).sum())
                draws["all"] += len(ids)
                draws["unlikely"] += int((p[ids] < MIN_DRAWN_PROB).sum())
            if not mode.sparse:
                cached = cache.raw_logits(split, view, rows=at_row)[0]
                worst = max(worst, off(fresh, cached))
            checked += 1
    at = ", each at a random view" if cache.views("train") > 1 else ""
    if mode.has_draws:
        same = draws["same"] / max(1, draws["all"])
        if mode.has_topk and worst > 1.0:
            return (f"FAILED: cached top-k classes, logits and tail differ from a fresh forward pass "
                    f"({worst:.1f}x the {m['dtype']} tolerance)")
        head = f"top-k classes, logits and tail within {worst:.2f} of tolerance; " if mode.has_topk else ""
        return (
            f"ok ({checked} rows{at}: {head}{same:.2%} of {draws['all']:,} draws re-drawn identically "
            f"from a fresh forward pass, none of a class it gives < {MIN_DRAWN_PROB:g})"
            if same >= SAME_DRAWS and not draws["unlikely"] else
            f"FAILED: {draws['unlikely']} cached draws are of classes a fresh forward pass gives "
            f"< {MIN_DRAWN_PROB:g}, and {same:.1%} re-draw identically (need {SAME_DRAWS:.0%})")
    else:
        what = "top-k classes, logits and tail" if mode.has_topk else "logits"
        return (f"ok ({checked} rows{at}, {what} within {worst:.2f} of "
                                      "tolerance)" if worst <= 1.0 else
                                      f"FAILED: cached {what} differ from a fresh forward pass "
                                      f"({worst:.1f}x the {m['dtype']} tolerance)")


def _augmentation(cache: TeacherCache, dataset) -> str:
    """Every stored augmentation parameter against the one drawn again from its seed."""
    policy = parse(cache.augment["policy"], dataset.input_shape)
    ids = cache.sample_ids("train")
    drawn = view_params(policy, int(cache.augment["seed"]), "train", ids, cache.views("train"))
    stored = cache.augment_params("train")
    same = np.array_equal(stored, drawn.astype(stored.dtype))
    return (f"ok ({stored.shape[0]:,} rows x {stored.shape[1]} views)" if same else
            f"FAILED: {int((stored != drawn).any(axis=(1, 2)).sum())} rows hold parameters other than "
            f"those drawn from seed {cache.augment['seed']}")


def _reading(check) -> str:
    """A check that reads cached values: one that meets a damaged shard or index has failed
    (the checksum checks name what is damaged), and the other checks still run."""
    try:
        return check()
    except KdError as exc:
        return f"FAILED: {exc}"


def damaged_shards(cache: TeacherCache) -> dict[tuple[str, int], list[str]]:
    """``{(split, shard): [array keys]}`` of every shard whose stored bytes do not match the
    sha256 recorded when it was written (a chunk failing its CRC32C, a truncated or missing
    shard file included). Reads every shard once."""
    bad: dict[tuple[str, int], list[str]] = {}
    for split, records in cache.manifest["shards"].items():
        for rec in records:
            for key, expected in rec["sha256"].items():
                try:
                    data = cache.stored(key, rec["start"], rec["stop"])
                    ok = hashlib.sha256(data.tobytes()).hexdigest() == expected
                except Exception:  # a CRC failure or a missing chunk
                    ok = False
                if not ok:
                    bad.setdefault((split, rec["shard"]), []).append(key)
    return bad


def damaged_indexes(cache: TeacherCache) -> list[str]:
    """The splits whose Parquet index is missing or does not match its recorded sha256."""
    return [s for s, info in cache.manifest["splits"].items()
            if not fmt.index_path(cache.root, s).is_file()
            or storage.sha256(fmt.index_path(cache.root, s)) != info["index_sha256"]]


def apportion(rows: int, sizes: dict[str, int]) -> dict[str, int]:
    """``rows`` shared among splits in proportion to their sizes so that the shares add up to
    exactly ``rows`` (largest remainders get the leftovers), each split at least 1 row and at
    most all of its rows."""
    total = sum(sizes.values())
    exact = {split: min(rows, total) * n / total for split, n in sizes.items()}
    share = {split: int(q) for split, q in exact.items()}
    by_remainder = sorted(sizes, key=lambda split: exact[split] - share[split], reverse=True)
    for split in by_remainder[:min(rows, total) - sum(share.values())]:
        share[split] += 1
    return {split: min(sizes[split], max(1, k)) for split, k in share.items()}
