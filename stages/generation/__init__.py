"""Parts of the generate stage: the request cache, the backends that answer, the filters that judge."""
