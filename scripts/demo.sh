#!/usr/bin/env bash
# Set up .venv (idempotent) and run the whole p2n pipeline on an embedded local Ray: `p2n demo`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
export PYTHONUNBUFFERED=1 DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
exec .venv/bin/p2n demo --out "${1:-outputs/demo}"
