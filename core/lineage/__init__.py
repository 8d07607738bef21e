"""Lineage: the DuckDB store of runs and datasets (``store``) and its OpenLineage export (``openlineage``)."""
