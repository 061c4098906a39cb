"""kdcache: run a teacher once into a versioned cache, then train many students from it.

Importing this package does no work. The public entry points:

- :func:`pipeline.cache.open_cache` opens a finished teacher cache for reading.
- :mod:`pipeline.registry` holds the registries of datasets, teachers, students and losses.
"""

__version__ = "0.1.0"
