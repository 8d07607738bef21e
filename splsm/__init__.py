"""splsm: self-powered large speech-text models, from ASR corpora to an evaluated checkpoint."""

__version__ = "0.1.0"
