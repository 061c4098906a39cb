"""kdcache: run a teacher once into a versioned cache, then train many students from it.

Importing this package does no work. The public entry points:

- :func:`pipeline.cache.open_cache` opens a finished teacher cache for reading.
- :mod:`pipeline.registry` is the one registry type; each kind's registry lives with its kind
  (``pipeline.data.DATASETS``, ``pipeline.teachers.TEACHERS``, ``pipeline.students.STUDENTS``,
  ``pipeline.losses.LOSSES``, ``pipeline.augment.POLICIES``).
"""

__version__ = "0.1.0"
