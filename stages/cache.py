"""Stage one: run the teacher once over a dataset into a versioned, sharded cache.

    kdcache cache dataset=digits                        # trains the default teacher if needed
    kdcache cache dataset=npz:my.npz teacher=cnn1d teacher_ckpt=teacher.pt temperature=4
    kdcache cache scheduler=tcp://host:8786             # shards run on a dask cluster
    kdcache cache cache=s3://bucket/caches/digits       # the cache on object storage

An interrupted build resumes where it stopped when re-run with the same arguments. A complete
cache is not re-read; ``kdcache cache cache=PATH repair=true`` checks every shard and index
against its checksum and recomputes the damaged ones, with the settings the cache was built with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.cache.build import build_cache, repair_settings
from pipeline.cache.execute import check_scheduler
from pipeline.augment import parse
from pipeline.cache.plan import check_token_teacher, prepare, teacher_cost
from pipeline.cache.summary import describe, summarise
from pipeline.config import CacheConfig
from pipeline.data import open_dataset, split_spec
from pipeline.hf import resolve_model
from pipeline.hf_lm import PRETRAINED, HfCausalLM, gguf_architecture
from pipeline.paths import default_cache_path
from pipeline.settings import resolve
from pipeline.sparse import check_mode, parse_mode
from pipeline.storage import check_reachable, location
from pipeline.teacher_training import stored_teacher, teacher_arch, teacher_dir, train_teacher
from pipeline.teachers import create_teacher


def main(args: list[str]) -> dict:
    cfg = resolve(CacheConfig, args, verb="cache")
    if cfg.repair:  # the cache's own settings: `kdcache cache cache=PATH repair=true` is enough
        cfg = repair_settings(cfg)
    check_scheduler(cfg)  # an unreachable scheduler: one line, before anything is done
    cfg = teacher_tokenizer(cfg)
    dataset = open_dataset(cfg)
    arch = teacher_arch(cfg, dataset)
    parse(cfg.augment, dataset.input_shape)  # fail fast on a views policy that does not fit the inputs
    check_token_teacher(arch, dataset, cfg.gguf_file)  # a token dataset: a causal LM, before it loads
    model = create_teacher(arch, dataset.input_shape, dataset.num_classes, cfg.teacher_ckpt,  # ... a
                           max_length=cfg.max_length,  # teacher that cannot fit them (a text
                           gguf_file=cfg.gguf_file)  # teacher: loads the model)
    check_mode(parse_mode(cfg.logits), dataset.num_classes)  # ... and a topk:K of every class
    root = location(cfg.cache) if cfg.cache else default_cache_path(
        cfg.cache_root, dataset.spec, arch, cfg.teacher_ckpt, cfg.seed, cfg.views, cfg.augment, cfg.logits)
    check_reachable(root)  # ... and an object store's bucket or credentials that do not work

    # 1. Which weights: the user's checkpoint, seeded random ones, or the trained default of
    # this data and these training settings (refused if it records other data).
    if isinstance(model, HfCausalLM):  # a causal LM runs its directory's own weights
        ckpt = cfg.teacher_ckpt or PRETRAINED
    else:
        ckpt = cfg.teacher_ckpt or str(stored_teacher(cfg, dataset) or "")
    del model
    if not ckpt:
        print(f"no trained {arch} teacher for {dataset.spec} with these training settings yet; "
              f"training one first (into {teacher_dir(cfg, dataset)})")
        ckpt = train_teacher(cfg, dataset)["checkpoint"]

    # 2. Fingerprint the teacher and learn its output shapes; lay out and plan the cache.
    cfg, spec, manifest = prepare(cfg, dataset, arch, ckpt)

    # 3. Compute the shards that are not done yet (all of them, on a fresh cache).
    # (a new cache also records what deploying the teacher costs: timed once, on the CPU)
    manifest, run = build_cache(root, cfg, dataset, spec, manifest,
                                measure_teacher=lambda: teacher_cost(spec, dataset))

    # 4. Summarise.
    summary = summarise(root, manifest)
    summary.update(computed_rows=run["computed_rows"], computed_outputs=run["computed_outputs"],
                   skipped=run["skipped"], repaired=run["repaired"], seconds=round(run["seconds"], 2),
                   outputs_per_s=round(run["computed_outputs"] / run["seconds"], 1) if run["seconds"] else None)
    if "lm" in manifest:  # a token cache: positions (padding included: the teacher runs them too)
        positions = run["computed_rows"] * int(manifest["lm"]["seq_len"])
        summary.update(computed_positions=positions,
                       tokens_per_s=round(positions / run["seconds"], 1) if run["seconds"] else None)
    print(describe(summary))
    if run["repaired"]:
        print(f"repaired {len(run['repaired'])} damaged shards ({', '.join(run['repaired'][:5])}"
              f"{', ...' if len(run['repaired']) > 5 else ''}): recomputed {run['computed_rows']:,} rows "
              f"in {run['seconds']:.1f}s; every shard and index matches its checksum again")
    elif cfg.repair and run["skipped"]:
        print("(every shard and index matches its checksum: nothing recomputed)")
    elif run["skipped"]:
        print("(cache was already complete: nothing recomputed; repair=true re-checks every "
              "shard and recomputes damaged ones)")
    elif "lm" in manifest:  # a token cache: the teacher's work is per position, every window's T
        print(f"computed {run['computed_rows']:,} windows ({summary['computed_positions']:,} positions) "
              f"in {run['seconds']:.1f}s ({summary['tokens_per_s']:,.0f} tokens/s)")
    else:
        views = f" ({run['computed_outputs']:,} with their views)" if cfg.views > 1 else ""
        print(f"computed {run['computed_rows']:,} rows{views} in {run['seconds']:.1f}s "
              f"({summary['outputs_per_s']:,.0f} teacher outputs/s)")
    return summary


TOKEN_SOURCE = "tokens"  # dataset=tokens:PATH (pipeline.data.tokens)


def teacher_tokenizer(cfg: CacheConfig) -> CacheConfig:
    """A token dataset with no ``tokenizer=`` given is tokenized with the ``hf:`` teacher's
    own tokenizer: its model directory, or for a GGUF teacher its GGUF file (which holds the
    tokenizer; ``tokenizer=DIR/NAME.gguf``). Saved in the cache's config, so that students,
    verify and dask workers reopen the same windows."""
    if (split_spec(cfg.dataset)[0] != TOKEN_SOURCE or not cfg.teacher.startswith("hf:")
            or "tokenizer" not in {f.name for f in dataclasses.fields(cfg)} or getattr(cfg, "tokenizer")):
        return cfg
    folder = resolve_model(cfg.teacher.removeprefix("hf:"), cfg.gguf_file)
    if cfg.gguf_file:  # a file that is no GGUF is named as the teacher's, not as a tokenizer=
        gguf_architecture(folder / cfg.gguf_file)
    return dataclasses.replace(cfg, tokenizer=str(folder / cfg.gguf_file if cfg.gguf_file else folder))
