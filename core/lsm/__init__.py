"""The large speech-text model and what feeds it, shared by the train and evaluate stages.

``features``: Whisper log-mels in torch; ``batch``: rows and clips to a ``SpeechBatch`` (the one collate
function training and evaluation both use); ``loader``: the streaming training loader over the build
stage's shards; ``model``: Whisper encoder, window-level Q-Former, projection and LLM.
"""
