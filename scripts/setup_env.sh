#!/usr/bin/env bash
# Create (or reuse) .venv with p2n and everything it needs. Idempotent: re-running after a finished install
# only checks a stamp. torch is installed FIRST and then pinned, so no later package can swap it for another
# build (on a CPU-only machine PyPI's newer torch would pull a multi-GB CUDA build).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${P2N_VENV:-$root/.venv}"
torch_spec="${P2N_TORCH:-torch==2.13.0}"
stamp="$venv/.p2n-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[p2n] installing $torch_spec" >&2
  "${pip[@]}" install -q "$torch_spec"
fi
"${pip[@]}" freeze | grep -iE '^torch==' > "$venv/constraints.txt"
echo "[p2n] installing p2n[all] with $(cat "$venv/constraints.txt")" >&2
"${pip[@]}" install -q -c "$venv/constraints.txt" -e "$root[all]"
# On CPU, DeepSpeed compiles its shared-memory allreduce op the first time a training process group starts: ~30 s
# of g++ on 2 cores inside the first training stage. Build it once here instead (cached in ~/.cache/torch_extensions).
if ! "$venv/bin/python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "[p2n] building DeepSpeed's CPU shared-memory comm op" >&2
  DS_ACCELERATOR=cpu "$venv/bin/python" -c "
from p2n.train.engine import clear_stale_build_locks
clear_stale_build_locks()  # a lock left by a killed build would make the load below wait forever
from deepspeed.accelerator import get_accelerator
b = get_accelerator().create_op_builder('ShareMemCommBuilder')
b is not None and b.load(verbose=False)" >/dev/null 2>&1 \
    || echo "[p2n] note: the op did not build now; DeepSpeed builds it on first use (or falls back to gloo)" >&2
fi
echo "$want" > "$stamp"
