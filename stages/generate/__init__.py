"""generate: the LLM answers an instruction about each transcript -> the responses table.

``stage`` the contract; ``driver`` the plan, the shards and the merge; ``backends`` one module per way of
reaching the LLM; ``cache`` every answer on disk as it arrives; ``filters`` the verdicts on the answers.
The instruction catalog and the prompt formats are shared with other stages (``core.catalog``,
``core.prompts``).
"""
