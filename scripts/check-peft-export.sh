#!/usr/bin/env bash
# Checks `snella export --peft` against Hugging Face peft itself: trains a short LoRA-8 run of the README's
# recipe (DINOv2 ViT-S/14 on Fashion-MNIST, 56 px), exports it as a peft adapter in every layout (timm, hf,
# hf4), loads the timm one and the one of the installed transformers (hf: 5.x, hf4: 4.x) with
# `PeftModel.from_pretrained` onto the base model in PyTorch (timm VisionTransformer, transformers
# Dinov2ForImageClassification) and compares the logits with `snella eval` on the same images.
# Exit 0 when both agree (max |logit difference| <= 1e-4 of the largest logit, same argmax everywhere).
#
# Not part of CI: it installs PyTorch (the PyPI wheel with its CUDA libraries, about 3 GB; the CPU is used) with
# peft, timm and transformers into .tools/peft-venv (scripts/requirements-peft.txt). Needs python3 3.10+ with
# pip and venv, network access to PyPI, and the assets of scripts/fetch-assets.sh (fetched if missing).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
venv="$root/.tools/peft-venv"
out="${OUT_DIR:-runs/peft-check}"
say() { echo "check-peft-export: $*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv"
    "$py" -m venv "$venv"
fi
say "installing scripts/requirements-peft.txt into $venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r scripts/requirements-peft.txt

[ -f assets/dinov2_vits14.safetensors ] && [ -d assets/fashion-mnist ] || scripts/fetch-assets.sh
cargo build --release --quiet
snella=target/release/snella
ck="$out/checkpoint.safetensors"
say "training LoRA-8 for one epoch into $out"
"$snella" train recipes/fashion-mnist-lora8.toml --quiet --export --set epochs=1 --set train_subset=256 \
    --set test_subset=64 --set "out_dir=$out" >/dev/null
"$snella" eval --checkpoint "$ck" --save-logits "$out/logits.safetensors"
for layout in timm hf hf4; do
    "$snella" export --checkpoint "$ck" --peft "$layout" --out "$out/peft-$layout"
done
"$venv/bin/python" scripts/check_peft_export.py "$out" assets/dinov2_vits14.safetensors
