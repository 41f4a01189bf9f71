#!/usr/bin/env bash
# Builds the release binary here, with every CUDA kernel compiled by nvcc 13.0, and puts it in .device/
# (ignored by git) for a GPU machine that has no Rust toolchain and no network. Then run there:
#     bash scripts/device-check.sh          with  .device  carried along (it is ignored, so name it)
# The golden cases in tests/golden are tracked files and travel with the tree; nothing to copy.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
NVCC="$(scripts/install-nvcc.sh | tail -n1)"
export NVCC
cargo build --release --bin snella
info="$(target/release/snella info)"
grep -q "CUDA kernels compiled in: yes" <<<"$info" || { echo "prepare-device: the binary has no CUDA kernels" >&2; exit 1; }
mkdir -p .device
# Debug info stripped: the tree that travels is limited in size (the symbols stay for backtraces).
if command -v objcopy >/dev/null; then
    objcopy --strip-debug target/release/snella .device/snella
else
    cp target/release/snella .device/snella
fi
chmod +x .device/snella
# The PyTorch reference benchmark, for the side-by-side run on the same card (../shared does not travel).
ref="$root/../shared/reference"
if [ -d "$ref" ]; then
    mkdir -p .device/reference
    cp "$ref"/*.py .device/reference/
else
    echo "prepare-device: $ref not found: the PyTorch side-by-side will be skipped on the device" >&2
fi
git -C "$root" check-ignore -q .device/snella || echo "prepare-device: warning: .device is not ignored by git" >&2
echo "prepare-device: .device/snella ($(du -h .device/snella | cut -f1)), built from $(git -C "$root" rev-parse --short HEAD)$(git -C "$root" diff --quiet || echo '+local changes')"
