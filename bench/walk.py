"""How far a student run's config travels through pipeline/: the files it enters, how often it
climbs back up to a higher floor, how often it re-enters a file it left.

    python -m bench.walk            # trains one tiny student and prints the walk

Method: a profile hook records every call, from one pipeline/ file into another, that takes
the run's config (a ``StudentConfig``) as an argument, from ``pipeline.runs.train_student``
on. A file's floor is its height in pipeline/'s import graph (imports inside functions
counted; the modules of an import circle share one floor): a call into a file of a higher
floor than the caller's is a *climb* (the lower module reaching back up, through a callback
or a deferred import). A *re-entry* is a call into a file the walk entered before and left.
"""

from __future__ import annotations

import ast
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """pipeline/'s modules and the first-party modules each imports (anywhere in the file)."""
    files = {module_of(p): p for p in (ROOT / "pipeline").rglob("*.py")}

    def target(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out |= {target(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                out |= {target(f"{base}.{a.name}") if f"{base}.{a.name}" in files else target(base)
                        for a in node.names}
        graph[name] = {m for m in out if m and m != name}
    return graph


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's floor: 0 for modules importing no other, else one above the highest it
    imports; the modules of a cycle (a strongly connected component) share one floor."""
    index, low, stack, on, comp, counter = {}, {}, [], set(), {}, [0]
    sys.setrecursionlimit(10_000)

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            while True:
                w = stack.pop()
                on.discard(w)
                comp[w] = v
                if w == v:
                    break

    for v in graph:
        if v not in index:
            connect(v)
    members: dict[str, set[str]] = {}
    for v, c in comp.items():
        members.setdefault(c, set()).add(v)
    height: dict[str, int] = {}

    def floor_of(c):
        if c not in height:
            height[c] = -1  # (guard; the condensation has no cycle)
            below = {comp[w] for v in members[c] for w in graph[v]} - {c}
            height[c] = 1 + max((floor_of(b) for b in below), default=-1)
        return height[c]

    return {v: floor_of(comp[v]) for v in graph}


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build

    from pipeline.config import StudentConfig
    from pipeline.settings import resolve
    from pipeline.runs import train_student

    work = Path(tempfile.mkdtemp(prefix="kdcache-walk-"))
    build(work / "cache", work)
    args = [f"cache={work / 'cache'}", f"runs_dir={work / 'runs'}", "model=mlp", "epochs=1"]
    try:
        from pipeline.students import complete
    except ImportError:  # (kdcache before hyperparameters were declared: to measure "before")
        cfg = resolve(StudentConfig, args)
    else:
        cfg = resolve(StudentConfig, args, params=complete)
    floor = floors(import_graph())
    pipeline_dir = str(ROOT / "pipeline")
    carrying: list[tuple[str, str]] = []  # cross-file calls that take the run's config
    setup: list[tuple[str, str]] = []  # every cross-file call outside the student's fit
    fitting = [0]

    def profile(frame, event, arg):
        code = frame.f_code
        if code.co_name == "fit_cache" and code.co_filename.startswith(pipeline_dir):
            fitting[0] += 1 if event == "call" else -1 if event == "return" else 0
            if event != "call":
                return
        if event != "call" or not code.co_filename.startswith(pipeline_dir):
            return
        caller = frame.f_back
        if caller is None or not caller.f_code.co_filename.startswith(pipeline_dir):
            return
        if caller.f_code.co_filename == code.co_filename:
            return
        step = (module_of(Path(caller.f_code.co_filename)), module_of(Path(code.co_filename)))
        if not fitting[0] or code.co_name == "fit_cache":
            setup.append(step)
        if any(isinstance(v, StudentConfig) for v in frame.f_locals.values()):
            carrying.append(step)

    sys.setprofile(profile)
    try:
        train_student(cfg, progress=False)
    finally:
        sys.setprofile(None)
    cyclic = sorted(m for m in floor if sum(floor[m] == floor[n] for n in floor) > 1
                    and any(floor[n] == floor[m] for n in import_graph()[m]))
    print(f"modules of pipeline/ in an import circle (sharing a floor): {len(cyclic)}")
    for label, calls in (("calls carrying the run's config", carrying),
                         ("cross-file calls outside the fit", setup)):
        seen, left, reentries, climbs = set(), None, 0, 0
        for caller, callee in calls:
            climbs += floor.get(callee, 0) > floor.get(caller, 0)
            reentries += callee in seen and callee != left
            seen.add(callee)
            left = caller
        print(f"{label}: {len(calls)}; files entered {len(seen)}, climbs to a higher floor "
              f"{climbs}, re-entries {reentries}")
    print("climbs among the calls outside the fit (a lower floor calling up, through a callback):")
    for caller, callee in dict.fromkeys(setup):
        if floor.get(callee, 0) > floor.get(caller, 0):
            print(f"  {caller} (floor {floor.get(caller)}) -> {callee} (floor {floor.get(callee)})")
    print("the walk of the run's config:")
    for caller, callee in carrying:
        mark = "  <- climb" if floor.get(callee, 0) > floor.get(caller, 0) else ""
        print(f"  {caller} (floor {floor.get(caller)}) -> {callee} (floor {floor.get(callee)}){mark}")


if __name__ == "__main__":
    main()
