#!/usr/bin/env bash
# Installs the pinned nvcc 13.0 toolchain from PyPI (hashes checked) into .tools/nvcc of the repo.
# 13.0 is pinned because 13.1+ emits PTX 9.1+, which the H100/H200 driver 580 (CUDA 13.0) cannot load;
# all five wheels are pinned because the nvcc wheel names its companions without versions.
# Idempotent: a second run only checks the version and returns.
# Prints the nvcc path on its last line; build with  NVCC=$(scripts/install-nvcc.sh | tail -n1) cargo build
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.tools/nvcc"
nvcc="$dest/nvidia/cu13/bin/nvcc"
req="$root/scripts/requirements-nvcc.txt"
stamp="$dest/.installed-$(sha256sum "$req" | cut -c1-16)"
if [ -x "$nvcc" ] && [ -f "$stamp" ] && "$nvcc" --version | grep -q "release 13.0"; then
    echo "nvcc 13.0 already installed" >&2
    echo "$nvcc"
    exit 0
fi
py=$(command -v python3 || command -v python) || { echo "install-nvcc: python3 is needed to install nvcc from PyPI" >&2; exit 1; }
rm -rf "$dest"
mkdir -p "$dest"
"$py" -m pip install --quiet --disable-pip-version-check --no-cache-dir --require-hashes --no-deps \
    --target "$dest" -r "$req" >&2
"$nvcc" --version | grep -q "release 13.0" || { echo "install-nvcc: $nvcc is not release 13.0" >&2; exit 1; }
touch "$stamp"
echo "nvcc 13.0 installed in $dest" >&2
echo "$nvcc"
