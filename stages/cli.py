"""``kdcache VERB [key=value ...] [--json]`` — the one command-line grammar of kdcache.

Bad input (a :class:`KdError`) prints one line on stderr and exits with code 2; Ctrl-C exits
with 130 and leaves every artifact resumable. With ``--json`` the verb's summary is printed as
one JSON object on the last line of stdout.
"""

from __future__ import annotations

# First, before anything imports torch: importing the package sets OMP_WAIT_POLICY=PASSIVE
# unless the user set it (see pipeline/__init__.py), which libgomp reads once, as torch loads it.
import pipeline  # noqa: F401  (isort: skip)

import importlib
import json
import sys

from pipeline.errors import KdError, StoppedEarly

VERBS = {
    "teacher": ("stages.teacher", "train the teacher for a dataset (saved under data/teachers)"),
    "cache": ("stages.cache", "run the teacher once over a dataset into a cache (stage one)"),
    "info": ("stages.info", "summarise a cache"),
    "student": ("stages.student", "train one student from a cache (stage two)"),
    "sweep": ("stages.sweep", "train a grid of students from one cache"),
    "report": ("stages.report", "leaderboard and plots of a cache's results table"),
    "verify": ("stages.verify", "re-check a cache's checksums, teacher outputs and dataset"),
    "export": ("stages.export", "export a trained student as ONNX or skops, checked against its run"),
}


def usage() -> str:
    lines = ["usage: kdcache VERB [key=value ...] [--json]", "", "verbs:"]
    lines += [f"  {verb:<8} {text}" for verb, (_, text) in VERBS.items()]
    lines += ["", "Keys are config field names, e.g. `kdcache cache dataset=digits teacher=cnn_small`.",
              "Pass config=FILE.yaml to read keys from a file; key=value arguments win."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = args[0], args[1:]
    as_json = "--json" in rest
    rest = [a for a in rest if a != "--json"]
    try:
        if verb not in VERBS:
            raise KdError(f"unknown verb {verb!r}; verbs: {', '.join(VERBS)}")
        flags = [a for a in rest if a.startswith("-")]
        if flags:
            raise KdError(f"unknown option {flags[0]!r}; kdcache takes key=value arguments and --json")
        module = importlib.import_module(VERBS[verb][0])
        summary = module.main(rest)
    except KdError as exc:
        print(f"kdcache {verb}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # an object store's failure that no verb translated: still one line
        from pipeline.storage import describe_error

        text = describe_error(exc)
        if text is None:
            raise
        print(f"kdcache {verb}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        kept = str(exc) if isinstance(exc, StoppedEarly) else \
            "nothing finished was lost — re-run the same command to resume"
        print(f"kdcache {verb}: interrupted; {kept}", file=sys.stderr)
        return 130
    if as_json:
        sys.stdout.flush()
        print(json.dumps(summary, sort_keys=True, default=str))
    return 1 if summary.get("ok") is False else 0  # a check that ran and failed (verify)


if __name__ == "__main__":
    sys.exit(main())
