"""The evaluate stage's parts: decoding, WER, the speech-anchor-bias probe, spoken QA, the report."""
