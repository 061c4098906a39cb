"""kdcache: run a teacher once into a versioned cache, then train many students from it.

Importing this package does no work beyond preferring a passive OpenMP wait policy (below).
The public entry points:

- :func:`pipeline.cache.open_cache` opens a finished teacher cache for reading.
- :mod:`pipeline.registry` is the one registry type; each kind's registry lives with its kind
  (``pipeline.data.DATASETS``, ``pipeline.teachers.TEACHERS``, ``pipeline.students.STUDENTS``,
  ``pipeline.losses.LOSSES``, ``pipeline.augment.POLICIES``).
"""

import os

__version__ = "0.1.0"

# libgomp (torch's OpenMP on Linux) spin-waits between parallel regions by default: with any
# other process on the cores, a training loop of small ops then ran 16-70x slower (issue #28;
# docs/BENCHMARKS.md, student_threads). Passive waiting costs ~50-90 us per region on an idle
# machine. libgomp reads the variable once, when torch loads it, so it is set here, when the
# package is first imported (the CLI does so before anything imports torch); a value the
# user set wins. A program that imported torch before kdcache keeps libgomp's default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
