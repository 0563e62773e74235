#!/usr/bin/env bash
# The GPU check on a bare, offline GPU machine: installs the wheels that `make gpu-wheels` put in .whl/ into a
# temporary target (nothing is fetched), then runs bench/gpu_check.py, whose options follow OUT:
#   bash bench/gpu_check.sh OUT [--gpus N] [--budget-s 480] [--only PART,PART] [--dry-run]
# Without .whl/ it runs on the packages already installed (a machine set up with `make install`).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu_check.sh OUT [--gpus N] [--budget-s S] [--only PARTS] [--dry-run]}
shift
# .whl/ is built for CPython 3.12 (the GPU machine's); any other Python uses what it has installed.
if compgen -G ".whl/*.whl" >/dev/null && python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  site=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
else
  echo "gpu_check.sh: no CPython 3.12 wheels to install (make gpu-wheels): using the installed packages" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec python3 bench/gpu_check.py --out "$out" "$@"
