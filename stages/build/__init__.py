"""build: transcripts and answers -> training examples, deduplicated, split, mixed and sharded.

``stage`` the contract; ``examples`` the join and the order of steps; ``dedup`` exact and near duplicates;
``mix`` task shares; ``shards`` the files the training loader streams; ``seeded`` the hash positions every
choice comes from.
"""
