"""The shared package: what every stage builds on and nothing above it.

Config loading and checks (``config``), the paths under a work directory (``paths``), the stage contract
and its reuse check (``stage``, ``codehash``), lineage (``lineage``), table I/O with schema checks
(``tables``), atomic outputs (``atomic``), child processes (``proc``), audio, transcript text forms, the
instruction catalog and prompt formats, and ``lsm``: the model, loader and features that train and
evaluate share. It imports only ``schemas`` below it; stages, flows and the CLI import it.
"""

__version__ = "0.1.0"
