"""The five stages of the pipeline. Each is a plain function over files, with a CLI in splsm.cli."""
