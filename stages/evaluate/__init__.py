"""evaluate: a checkpoint and the eval sets -> WER, the speech-anchor-bias probe, spoken QA, a report.

``stage`` the contract; ``evaluator`` the run; ``decoding`` batched greedy or beam decoding; ``wer`` scoring;
``probe`` the anchor-bias probe; ``qa`` spoken yes/no questions; ``report`` Markdown, HTML, plots and
Prefect artifacts; ``compare`` two evaluated work directories side by side.
"""
