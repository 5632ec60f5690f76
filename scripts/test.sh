#!/usr/bin/env bash
# Run p2n's test suite, creating .venv first if needed (scripts/setup_env.sh is idempotent).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
bash scripts/install_browser.sh || true  # the browser test skips with a reason when none can be had
export PYTHONUNBUFFERED=1 DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" RAY_DEDUP_LOGS=0
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
