#!/usr/bin/env bash
# Run HERE (no GPU needed): put into .whl/ every wheel the GPU bench needs that the device image lacks
# (the image has torch, transformers, peft, pandas, rich, tqdm, safetensors, psutil, scipy, matplotlib),
# plus this checkout as a wheel. Then, on the GPU machine: `bash scripts/gpu/bench.sh` with .whl carried.
#   bash scripts/gpu/prepare.sh            # -> .whl/*.whl (git-ignored), about 1 MB
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
rm -rf .whl && mkdir -p .whl
# pure-Python packages: built here as py3-none-any wheels (antlr4 4.9.3 and geomloss ship sdists only)
"$PY" -m pip wheel -q --no-deps -w .whl 'hydra-core>=1.3.2,<1.4' 'omegaconf>=2.3,<2.4' \
  'antlr4-python3-runtime==4.9.3' 'geomloss>=0.2.6' .
ls .whl
for w in .whl/*.whl; do
  case "$w" in *-py3-none-any.whl | *-py2.py3-none-any.whl) ;; *) echo "error: $w is not a pure-Python wheel" >&2; exit 1 ;; esac
done
echo "ok: $(ls .whl | wc -l) wheels in .whl ($(du -sh .whl | cut -f1)); carry .whl and run scripts/gpu/bench.sh there"
