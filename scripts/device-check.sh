#!/usr/bin/env bash
# The one script to run on a lent GPU machine (no Rust, no network). Needs .device/snella, made here by
# scripts/prepare-device.sh; .device is ignored by git, so the run must carry it. Prints the GPU and the
# CUDA libraries the loader sees, finds cuBLAS inside PyTorch's install when the loader does not, then
# runs `snella info` and `snella selftest --device cuda`. Every log goes under $OUT (default
# ./device-out). It goes on after a failure and exits with the selftest's status.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUT="${OUT:-$root/device-out}"
mkdir -p "$OUT"
bin="$root/.device/snella"
export SNELLA_GOLDEN="${SNELLA_GOLDEN:-$root/tests/golden}"

section() { printf '\n=== %s\n' "$*"; }

{
    section "nvidia-smi"
    nvidia-smi || echo "(nvidia-smi failed with status $?)"
    section "ldconfig -p | grep -E 'libcuda|libcublas'"
    ldconfig -p | grep -E 'libcuda|libcublas' || echo "(neither libcuda nor libcublas is on the loader path)"
} 2>&1 | tee "$OUT/environment.log"

# cuBLAS: the loader path first, else the nvidia-* wheels that PyTorch installs (cu13/lib, cublas/lib).
if ! ldconfig -p | grep -q 'libcublas\.so'; then
    found=""
    dirs="$(python3 -c 'import nvidia; print("\n".join(nvidia.__path__))' 2>/dev/null || true)"
    for d in $dirs; do
        for sub in cu13/lib cublas/lib; do
            if compgen -G "$d/$sub/libcublas.so*" >/dev/null; then found="$d/$sub"; break 2; fi
        done
        lib="$(find "$d" -name 'libcublas.so*' 2>/dev/null | head -n1)"
        if [ -n "$lib" ]; then found="$(dirname "$lib")"; break; fi
    done
    if [ -n "$found" ]; then
        export LD_LIBRARY_PATH="$found${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "cuBLAS from PyTorch's install: LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee -a "$OUT/environment.log"
    else
        echo "cuBLAS not found on the loader path nor in python3's nvidia packages" | tee -a "$OUT/environment.log"
    fi
fi

if [ ! -x "$bin" ]; then
    echo "device-check: $bin is missing: run scripts/prepare-device.sh first and carry .device" | tee "$OUT/selftest.log"
    exit 2
fi

section "snella info"
"$bin" info 2>&1 | tee "$OUT/info.log"

section "snella selftest --device cuda"
# Synchronise after every launch: a kernel that faults is then blamed by name, instead of the sticky
# error failing every later check.
SNELLA_SYNC_LAUNCH=1 "$bin" selftest --device cuda 2>&1 | tee "$OUT/selftest.log"
status=${PIPESTATUS[0]}
section "selftest exit status: $status"

# Measurements (skip with BENCH=0): planned vs measured memory, then images/s of this engine and of the
# PyTorch reference on the same card, in one run so their ratio is meaningful.
if [ "${BENCH:-1}" = 1 ]; then
    section "snella memory --measure (planned vs measured device memory, batch 8)"
    timeout 300 "$bin" memory --measure --methods lora8,gps,snell32,snella32 --json "$OUT/memory.json" 2>&1 | tee "$OUT/memory.log"
    section "snella memory --measure --precision bf16 (SNELLA-32 at block: the <= 0.35x target)"
    timeout 120 "$bin" memory --measure --precision bf16 --recompute block --methods snell32,snella32 --json "$OUT/memory_bf16.json" 2>&1 | tee "$OUT/memory_bf16.log"
    section "snella bench (ViT-B/16, batch 64, fp32)"
    timeout 240 "$bin" bench --models vit_b16 --batch 64 --methods full,lora8,snell32,snella32 --json "$OUT/bench.jsonl" 2>&1 | tee "$OUT/bench.log"
    section "snella bench (ViT-B/16, batch 64, bf16 storage, tf32 products)"
    timeout 120 "$bin" bench --models vit_b16 --batch 64 --methods snella32 --precision bf16 --gemm tf32 --json "$OUT/bench_bf16.jsonl" 2>&1 | tee "$OUT/bench_bf16.log"
    if [ -f "$root/.device/reference/bench.py" ]; then
        section "PyTorch reference bench.py (same card, batch 64, fp32, no TF32)"
        (cd "$root/.device/reference" && timeout 240 python3 bench.py --model vit_b16 --method full,lora8,snell32,snella32 --batch 64 --precision fp32) 2>&1 | tee "$OUT/bench_pytorch.jsonl"
        section "PyTorch reference bench.py (batch 8, memory)"
        (cd "$root/.device/reference" && timeout 240 python3 bench.py --model vit_b16,vit_l16,vit_h14 --method lora8,gps,snell32,snella32 --batch 8 --precision fp32) 2>&1 | tee "$OUT/bench_pytorch_b8.jsonl"
    fi
fi
exit "$status"
