"""models import-reference: the self-powered paper's released checkpoint -> this project's model directory.

``stage`` the contract; ``mapper`` reads the reference's checkpoint (its ``BlspModel``: ``whisper_model``,
``llama_model``, ``speech_Qformer``, ``speech_query_tokens``, ``speech_llama_proj``, ``ln_speech``) and maps every
tensor onto ``core.lsm.model.LSMForConditionalGeneration``, or says why it has no place there.
"""
