"""splsm: self-powered large speech-text models, from ASR corpora to an evaluated checkpoint.

This package is the user-facing layer: the ``splsm`` command (``cli``) and the runner that runs a stage
in-process, in a subprocess or in its container (``runner``, ``images``). Stage code lives in ``stages``,
what the stages share in ``core``.
"""

from core import __version__

__all__ = ["__version__"]
