"""A cache in a few lines: what `kdcache cache` and `kdcache info` print (and return as JSON)."""

from __future__ import annotations

from pipeline import storage
from pipeline.cache import format as fmt
from pipeline.data import SPLITS


def summarise(root, manifest: dict) -> dict:
    # in split order (the manifest's JSON sorts its keys)
    splits = {s: manifest["splits"][s] for s in SPLITS if s in manifest["splits"]}
    summary = {
        "cache": str(root), "status": manifest["status"],
        "dataset": manifest["dataset"]["spec"], "teacher": manifest["teacher"]["arch"],
        "teacher_fingerprint": manifest["teacher"]["fingerprint"][:16],
        "dataset_fingerprint": manifest["dataset"]["fingerprint"][:16],
        "rows": {s: v["rows"] for s, v in splits.items()},
        "teacher_accuracy": {s: v.get("accuracy") for s, v in splits.items()},
        "input_shape": manifest["teacher"]["input_shape"], "preprocessing": manifest.get("preprocessing"),
        "layers": manifest["layers"], "num_classes": manifest["num_classes"],
        "temperature": manifest["temperature"], "dtype": manifest["dtype"],
        "views": {s: fmt.split_views(manifest, s) for s in splits},
        "augment": (manifest.get("augment") or {}).get("policy"),
        "augment_seed": (manifest.get("augment") or {}).get("seed"),
        "format_version": manifest["format_version"],
        "teacher_cost": {k: manifest["teacher"].get(k) for k in ("num_params", "weights_bytes", "latency")},
        "bytes": manifest.get("bytes") or sum(storage.files(root).values()),
        "logits": {**(manifest.get("logits") or {"mode": "dense"}),
                   "bytes_per_row": logits_bytes(root, manifest) / max(1, sum(v["rows"] for v in splits.values()))},
    }
    if "lm" in manifest:  # token caches: windows of a causal LM's tokenizer
        lm = manifest["lm"]
        summary["lm"] = {"fingerprint": lm["tokenizer"]["fingerprint"], "vocab_size": lm["vocab_size"],
                         "outputs": lm["outputs"], "seq_len": lm["seq_len"], "pack": lm["pack"],
                         "tokens": {s: v.get("tokens") for s, v in splits.items()},
                         "teacher_nll": {s: v.get("teacher_nll") for s, v in splits.items()}}
    elif "tokenizer" in manifest:  # text caches: how documents became token ids
        summary["tokenizer"] = {k: manifest["tokenizer"][k] for k in
                                ("fingerprint", "vocab_size", "max_length", "truncation", "padding_side")}
        summary["tokens"] = manifest["tokens"]
    if manifest["status"] != "complete":
        summary["shards_done"] = "{}/{}".format(*fmt.shard_progress(root, manifest))
    return summary


def logits_bytes(root, manifest: dict) -> int:
    """Bytes on disk of every split's logits arrays (chunks, shard indexes, CRCs, metadata)."""
    return sum(size for split in manifest["splits"] for key in fmt.logits_keys(split, manifest)
               for size in storage.files(storage.location(root) / fmt.ARRAYS / key).values())


def logits_text(s: dict) -> str:
    """How the logits are kept, e.g. "topk:16 of 1,000 classes (uint16 ids, float16 logits,
    float32 tail; exact at T=1), 70.1 bytes/row"."""
    e, c = s["logits"], s["num_classes"]
    per_row = f"{e['bytes_per_row']:,.1f} bytes/row on disk (dense float32: {4 * c:,} per view)"
    if "lm" in s:  # a token cache: a row is a window, and a position takes a view's place
        per_row = (f"{e['bytes_per_row'] / s['lm']['seq_len']:,.1f} bytes/position on disk (dense float32: "
                   f"{4 * c:,})")
    if e["mode"] == "topk":
        return (f"topk:{e['k']} of {c:,} classes ({e['classes_dtype']} ids, {s['dtype']} logits, "
                f"float32 tail; exact at T=1, approximate elsewhere), {per_row}")
    if e["mode"] == "topk+sample":
        return (f"topk:{e['k']}+sample:{e['m']} of {c:,} classes (the top {e['k']} exactly, "
                f"{e['m']} draws from the rest at T={e['temperature']:g}; {e['classes_dtype']} ids, "
                f"{s['dtype']} logits, float32 tail, seed {e['seed']}; serves T={e['temperature']:g} "
                f"only), {per_row}")
    if e["mode"] == "sample":
        return (f"sample:{e['k']} of {c:,} classes drawn at T={e['temperature']:g} ({e['classes_dtype']} "
                f"ids, seed {e['seed']}; serves T={e['temperature']:g} only), {per_row}")
    return f"dense ({c:,},) {s['dtype']}, {per_row}"


SHOWN_STATS = 8  # channels whose mean and std `info` prints (manifest.json holds every one)


def inputs_text(s: dict) -> str:
    """The inputs' shape and normalisation, e.g. "(1, 8, 8) float32, normalised as (x - mean) /
    std per channel with train statistics: mean [4.88], std [6.015]": what a deployed teacher or
    student must be fed (README, "Deploy the student")."""
    pre = s["preprocessing"]
    if "lm" in s:
        lm = s["lm"]
        return (f"windows of {lm['seq_len']} token ids ({'packed' if lm['pack'] else 'one document each'}), "
                f"vocabulary {lm['vocab_size']:,} ({lm['outputs']:,} teacher outputs) "
                f"[{lm['fingerprint'][:16]}]; position j holds the teacher's distribution of token j+1")
    if "tokenizer" in s:
        t, counts = s["tokenizer"], s["tokens"].values()
        rows = sum(s["rows"].values())
        return (f"text (str), tokenized by the teacher: vocabulary {t['vocab_size']:,}, max_length "
                f"{t['max_length']} (truncation {t['truncation']}, padding {t['padding_side']}) "
                f"[{t['fingerprint'][:16]}]; {sum(c['tokens'] for c in counts) / max(1, rows):,.1f} "
                f"tokens/row, {sum(c['truncated'] for c in counts):,} rows truncated")

    def values(name: str) -> str:
        v = pre[name]
        more = f", ... ({len(v)} in all)" if len(v) > SHOWN_STATS else ""
        return "[" + ", ".join(f"{x:.7g}" for x in v[:SHOWN_STATS]) + more + "]"

    per = "per channel" if pre["normalise"] == "per-channel" else "(one scalar)"
    return (f"{tuple(s['input_shape'])} {pre['dtype']}, normalised as (x - mean) / std {per} with "
            f"{pre['stats_from']} statistics: mean {values('mean')}, std {values('std')}")


def describe(s: dict) -> str:
    rows = ", ".join(f"{k} {v:,}" for k, v in s["rows"].items())
    acc = ", ".join(f"{k} {v:.4f}" for k, v in s["teacher_accuracy"].items() if v is not None) or "n/a"
    layers = ", ".join(f"{k} {tuple(v)}" for k, v in s["layers"].items())
    layers = f"{layers} {s['dtype']}" if layers else "none (layers=none)"
    lines = [
        f"cache      {s['cache']} ({s['status']})",
        f"dataset    {s['dataset']}  [{s['dataset_fingerprint']}]",
    ]
    if s["preprocessing"]:
        lines.append(f"inputs     {inputs_text(s)}")
    lines += [
        f"teacher    {s['teacher']}  [{s['teacher_fingerprint']}]",
        f"rows       {rows}",
        f"accuracy   teacher: {acc}",
    ]
    if s["augment"]:
        lines.append(f"views      train {s['views']['train']} (view 0 as is, the rest augment="
                     f"{s['augment']}, seed {s['augment_seed']}); val and test 1")
    cost = s["teacher_cost"]
    if cost["latency"]:  # (caches built before kdcache measured it have none)
        lat = cost["latency"]
        unit = lat.get("per", "sample")  # a causal-LM teacher is timed per window, at batch 1 and 8
        batches = ", ".join(f"{lat[k]:.4g} at batch {k.split('_')[1]}" for k in lat if k.startswith("batch_"))
        lines.append(f"cost       teacher: {cost['num_params']:,} params, {cost['weights_bytes'] / 1e6:.2f} MB; "
                     f"CPU ms/{unit}: {batches} ({lat['threads']} threads)")
    lines += [
        f"stored     logits {logits_text(s)}; features {layers}; default temperature "
        f"{s['temperature']:g}",
        f"on disk    {s['bytes'] / 1e6:.2f} MB",
    ]
    if "shards_done" in s:
        lines.append(f"incomplete: {s['shards_done']} shards done; re-run `kdcache cache` with the same settings")
    return "\n".join(lines)
