"""Thin entry points, one per stage. Each ``main(args)`` parses ``key=value`` arguments, does
its stage top to bottom, prints a human summary and returns it as a dict (``--json``)."""
