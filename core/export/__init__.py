"""Exports of a work directory's tables into the formats other tools read: lhotse CutSets (``lhotse``) and
Hugging Face datasets (``hf``). Each reads the stages' published files through their schemas; none runs a
stage or writes into the work directory."""
