"""import-reference: the reference's own {instruction, audio, text} data -> a responses table build joins.

``stage`` the contract; ``importer`` the lines to answers and rejects; ``mapper`` instruction wordings to
catalog categories (with the reference's wordings: the bundled ``reference`` catalog and
``reference-instructions.yaml``).
"""
