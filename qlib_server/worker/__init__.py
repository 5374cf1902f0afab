"""The workers: what computes with Qlib.

``processor`` supervises the pool of worker processes that take tasks from the broker and run
``compute``; ``telemetry`` is what a processor shows of itself (its metrics port, its snapshot for the
status page); ``updater`` notices data changes and refreshes; ``datacache`` is Qlib's dataset cache made
safe for many workers and changing data, ``dataset`` computes a feature set as Qlib does, ``storage``
reads feature files. The workers import ``state``, ``broker`` and the top-level modules, never ``front``.
"""
