#!/usr/bin/env bash
# snella and the PyTorch reference (../shared/reference/bench.py) side by side on this machine's CPU, one
# method after the other (each engine's run of a method right after the other's, so both see the same load):
# full, LoRA-8, SNELLA-32 and the linear probe at ViT-B/16 batch 8 and DINOv2-S/14 224 px batch 32, fp32.
# Writes the ratio table, with the machine, the date and the load, between the bench-cpu-vs-pytorch markers
# of BENCHMARKS.md, and the raw JSON lines under $OUT (default target/bench-cpu-vs-pytorch).
#
# First use sets up a venv with PyTorch in .tools/torch-venv (the CPU wheel index when it is reachable, else
# PyPI's default wheel, which also runs on the CPU; a few GB). Speed goals live here, not in timed tests.
#
#   scripts/bench-cpu-vs-pytorch.sh                      # the whole table (about 15 min on 2 cores)
#   STEPS=3 WARMUP=1 METHODS=lora8,snella32 MODELS=vit_b16 scripts/bench-cpu-vs-pytorch.sh
#   WRITE=0 scripts/bench-cpu-vs-pytorch.sh              # print the table, leave BENCHMARKS.md alone
#   REPEATS=5 scripts/bench-cpu-vs-pytorch.sh            # more interleaved SNELLA-32 / LoRA-8 pairs (default 3)
#
# Our SNELLA-32 / LoRA-8 ratio is also taken from REPEATS pairs of runs back to back (SNELLA-32, then LoRA-8),
# reported with its median: the table's one pair is minutes apart (PyTorch runs between them), and on a shared
# 2-core machine one run of either method moves by ±10%.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
STEPS="${STEPS:-2}"
WARMUP="${WARMUP:-1}"
METHODS="${METHODS:-full,lora8,snella32,linear}"
MODELS="${MODELS:-vit_b16,dinov2_s14}"
RECOMPUTE="${RECOMPUTE:-none}" # PyTorch keeps every activation too (and recomputes M, as we do)
WRITE="${WRITE:-1}"
REPEATS="${REPEATS:-3}"
OUT="${OUT:-$root/target/bench-cpu-vs-pytorch}"
reference="${REFERENCE:-$root/../shared/reference}"
venv="$root/.tools/torch-venv"
mkdir -p "$OUT"
[ -f "$reference/bench.py" ] || { echo "bench-cpu-vs-pytorch: no $reference/bench.py (set REFERENCE)" >&2; exit 1; }

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "setting up $venv with PyTorch (first use)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --timeout 20 \
        --index-url https://download.pytorch.org/whl/cpu torch numpy 2>/dev/null \
        || "$venv/bin/pip" install --quiet --disable-pip-version-check torch numpy
fi
cargo build --release --quiet
snella="${CARGO_TARGET_DIR:-target}/release/snella"

batch_of() { case "$1" in dinov2_s14) echo 32 ;; *) echo 8 ;; esac; }
load() { cut -d' ' -f1-3 /proc/loadavg; }
raw="$OUT/raw.jsonl"
: >"$raw"
load_before="$(load)"
for model in ${MODELS//,/ }; do
    batch="$(batch_of "$model")"
    for method in ${METHODS//,/ }; do
        echo "== $model $method batch $batch (load $(load))" >&2
        "$snella" bench --device cpu --models "$model" --methods "$method" --batch "$batch" \
            --recompute "$RECOMPUTE" --warmup "$WARMUP" --steps "$STEPS" --json "$OUT/snella.json" >&2
        sed 's/^{/{"engine":"snella",/' "$OUT/snella.json" >>"$raw"
        # bench.py knows vit_b16/l16/h14; DINOv2-S/14 (LayerScale) is added to its table here.
        "$venv/bin/python" - "$reference" "$model" "$method" "$batch" "$STEPS" "$WARMUP" <<'EOF' | sed 's/^{/{"engine":"pytorch",/' >>"$raw"
import sys
ref, model, method, batch, steps, warmup = sys.argv[1:]
sys.path.insert(0, ref)
import bench
bench.MODELS.setdefault("dinov2_s14", dict(img_size=224, patch_size=14, embed_dim=384, depth=12, num_heads=6,
                                           mlp_hidden=1536, layer_scale=True))
sys.argv = ["bench.py", "--device", "cpu", "--model", model, "--method", method, "--batch", batch,
            "--steps", steps, "--warmup", warmup]
bench.main()
EOF
    done
done
pairs="$OUT/pairs.jsonl"
: >"$pairs"
if [[ ",$METHODS," == *",snella32,"* && ",$METHODS," == *",lora8,"* ]]; then
    for model in ${MODELS//,/ }; do
        batch="$(batch_of "$model")"
        for i in $(seq 1 "$REPEATS"); do
            for method in snella32 lora8; do
                echo "== pair $i: $model $method batch $batch (load $(load))" >&2
                "$snella" bench --device cpu --models "$model" --methods "$method" --batch "$batch" \
                    --recompute "$RECOMPUTE" --warmup "$WARMUP" --steps "$STEPS" --json "$OUT/pair.json" >&2
                sed "s/^{/{\"pair\":$i,/" "$OUT/pair.json" >>"$pairs"
            done
        done
    done
fi
load_after="$(load)"

python3 - "$raw" "$pairs" "$OUT/table.md" "$load_before" "$load_after" "$STEPS" "$WARMUP" "$RECOMPUTE" \
    "$("$venv/bin/python" -c 'import torch; print(torch.__version__)')" <<'EOF'
import json, platform, subprocess, sys, datetime
raw, pairs, out, lb, la, steps, warmup, recompute, torch_version = sys.argv[1:]
rows = [json.loads(l) for l in open(raw) if l.strip()]
ms = {}
for r in rows:
    ms[(r["engine"], r["model"], r["method"], r["batch"])] = r["step_ms"] / 1e3
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
flags = open("/proc/cpuinfo").read()
isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
names = {"full": "full", "lora8": "LoRA-8", "snella32": "SNELLA-32", "linear": "linear probe"}
keys = sorted({(m, b) for (_, m, _, b) in ms}, key=lambda k: (k[0] != "vit_b16", k[0]))
lines = [f"{datetime.date.today().isoformat()}, {cpu} ({cores} cores, {isa}), load average {lb} before and "
         f"{la} after; PyTorch {torch_version}; {warmup} warm-up + {steps} timed steps per engine and method, "
         f"snella at recompute `{recompute}`.", "",
         "| model | batch | method | snella s/step | PyTorch s/step | snella speed-up |", "|---|---|---|---|---|---|"]
for model, b in keys:
    for meth in ["full", "lora8", "snella32", "linear"]:
        s, p = ms.get(("snella", model, meth, b)), ms.get(("pytorch", model, meth, b))
        if s is None or p is None:
            continue
        lines.append(f"| {model} | {b} | {names[meth]} | {s:.2f} | {p:.2f} | {p / s:.2f}× |")
lines.append("")
for model, b in keys:
    for eng in ["snella", "pytorch"]:
        sn, lo = ms.get((eng, model, "snella32", b)), ms.get((eng, model, "lora8", b))
        if sn and lo:
            lines.append(f"- {model}: {eng}'s SNELLA-32 step is {sn / lo:.2f}× its LoRA-8 step.")
pair_ms = {}
for r in (json.loads(l) for l in open(pairs) if l.strip()):
    pair_ms.setdefault((r["model"], r["batch"], r["pair"]), {})[r["method"]] = r["step_ms"] / 1e3
for model, b in keys:
    ratios = [v["snella32"] / v["lora8"] for (m, bb, _), v in sorted(pair_ms.items()) if (m, bb) == (model, b)
              and {"snella32", "lora8"} <= v.keys()]
    if ratios:
        med = sorted(ratios)[len(ratios) // 2] if len(ratios) % 2 else sum(sorted(ratios)[len(ratios) // 2 - 1:][:2]) / 2
        lines.append(f"- {model}: snella's SNELLA-32 / LoRA-8 over {len(ratios)} back-to-back pairs: "
                     f"{', '.join(f'{r:.2f}×' for r in ratios)}; median **{med:.2f}×**.")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

if [ "$WRITE" = 1 ]; then
    python3 - "$root/BENCHMARKS.md" "$OUT/table.md" <<'EOF'
import sys
path, table = sys.argv[1:]
text, body = open(path).read(), open(table).read()
start, end = "<!-- bench-cpu-vs-pytorch:start -->", "<!-- bench-cpu-vs-pytorch:end -->"
if start not in text:
    sys.exit(f"{path} has no {start} marker")
head, rest = text.split(start, 1)
tail = rest.split(end, 1)[1]
open(path, "w").write(head + start + "\n" + body + end + tail)
print(f"table written into {path}", file=sys.stderr)
EOF
fi
