"""The teacher cache: its format, its writer (stage one) and its reader (stage two)."""

from pipeline.cache.reader import Batch, TeacherCache, open_cache

__all__ = ["Batch", "TeacherCache", "open_cache"]
