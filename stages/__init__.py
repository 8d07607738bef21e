"""The stages, one package each; ``stages.registry`` lists them.

Every stage package has the same shape: ``stage.py`` declares its contract (``core.stage.Stage``: inputs,
outputs, parameters, the body, its options), the other modules do its work. Stages never import each
other: they meet only through files and the schemas in ``schemas``. This package itself imports nothing,
so a worker process that needs one module of a stage loads only that.
"""
