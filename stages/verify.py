"""Check that a cache is still what its manifest says, end to end.

    kdcache verify cache=PATH [rows=256]

Shard and index checksums, the dataset and teacher fingerprints, and a fresh teacher forward
pass on a seeded sample of ``rows`` rows (see pipeline/cache/verify.py). Exit code 0 only when
every check passes (1 when one fails, a damaged shard or index included: the table names what
failed and the command that repairs it; 2 on bad input).
"""

from __future__ import annotations

from pipeline import runtime
from pipeline.cache import format as fmt
from pipeline.cache import open_cache
from pipeline.cache.verify import verify
from pipeline.config import VerifyConfig
from pipeline.paths import cache_path
from pipeline.settings import resolve


def main(args: list[str]) -> dict:
    cfg = resolve(VerifyConfig, args, verb="verify")
    cache = open_cache(cache_path(cfg))
    with runtime.torch_threads(cfg.threads):
        checks = verify(cache, cfg.rows, cfg.seed, cfg.device)
    ok = all(v.startswith("ok") for v in checks.values())
    for name, verdict in checks.items():
        print(f"{name:<24} {verdict}")
    print(f"verdict: {'PASS' if ok else 'FAIL'} — {cache.root}")
    if not all(checks[name] == "ok" for name in ("shard checksums", "index checksums")):
        print(f"repair: `{fmt.repair_command(cache.root)}` recomputes the damaged shards")
    return {"ok": ok, "cache": str(cache.root), "checks": checks}
