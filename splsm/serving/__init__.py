"""Asking a trained checkpoint: ``splsm ask`` (clips from the shell) and ``splsm serve`` (the OpenAI
chat-completions protocol over HTTP, ``input_audio`` parts, streaming, batching).

A user-facing layer beside the flows: it loads a checkpoint the way evaluate does, lays out its prompts as its
``recipe.json`` says (``core.recipe``), reads audio through ``core.audio``, batches with ``core.lsm.batch``
and decodes with the model's own batched greedy ``generate``. Nothing below it imports it.

- ``engine``: a loaded checkpoint that turns (clip, instruction) queries into answers, streamed or not;
- ``ask``: the command-line use of it;
- ``batcher``: the queue that decodes requests arriving together as one batch;
- ``app``: the FastAPI app (``create_app``), on which other pages can be mounted;
- ``page``: the web page at ``/`` (``static/``), a client of the app's own API, and the lineage beside it;
- ``server``: settings, the API-key rule and uvicorn.
"""
