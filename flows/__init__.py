"""Prefect flows that chain the stages; they hold no stage logic."""
