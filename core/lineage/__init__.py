"""Lineage: the DuckDB store of runs and datasets (``store``), its OpenLineage events and their transports
(``openlineage``), and what changed between two versions of a dataset (``diff``)."""
