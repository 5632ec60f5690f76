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
echo "$want" > "$stamp"
