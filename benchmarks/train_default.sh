#!/usr/bin/env bash
# Reproduces gvsl/assets/default: the small GVSL model shipped with gvsl.
#
#   bash benchmarks/train_default.sh [WORK_DIR] [ITERATIONS]
#
# Data: 32 synthetic subjects made by `gvsl synth` from nilearn's MNI ICBM152 2009a T1
# template (real anatomy shipped inside a Python package; no download). Licences:
# gvsl/assets/default/PROVENANCE.md.
# Training: `gvsl train` on CPU with the official objective and augmentation (GVSL_SPEC §4),
# widths 16,32,48,64,96,48,48,32,16 with a 32-wide affine head (so that weights +
# encoder.onnx + registration.onnx stay under 20 MB), at 4 mm, where one 48x64x48 patch
# holds the whole brain: the Z-matching head then sees the whole pair, which is what made
# it learn to register within a CPU budget (EVALUATION.md §1). Then `gvsl export` and a
# copy into gvsl/assets/default.
# Re-running with the same WORK_DIR resumes the run (bit-exact on the same machine); a run
# stopped with Ctrl-C is finished by re-running with the step it reached as ITERATIONS.
set -euo pipefail
WORK=${1:-runs/default}
ITERS=${2:-2000}

if [ ! -f "$WORK/data/mni/mni_synth.json" ]; then
    gvsl synth -o "$WORK/data/mni" --source mni --n 32 --seed 0 --spacing 2 --prefix mni
fi

RESUME=()
if [ -f "$WORK/run/checkpoints/last.pt" ]; then RESUME=(--resume); fi
# label maps are not training data: the images only
gvsl train "$WORK"/data/mni/mni_0[0-9][0-9].nii.gz -o "$WORK/run" "${RESUME[@]}" \
    --iterations "$ITERS" --batch-size 1 --patch-size 48,64,48 \
    --widths 16,32,48,64,96,48,48,32,16 --affine-width 32 --deform-width 16 --restore-width 16 \
    --lr 5e-4 --w-ncc 1 --w-mse 1 --w-smooth 1 --spacing 4 --modality mr \
    --checkpoint-every 50 --log-every 10 --seed 0 --device cpu

gvsl export "$WORK/run" -o "$WORK/export" --verify-shape 1,48,64,48 --force --quiet
python - "$WORK" <<'PY'
import shutil, sys
from pathlib import Path

work = Path(sys.argv[1])
dst = Path("gvsl/assets/default")
dst.mkdir(parents=True, exist_ok=True)
for f in ("model.safetensors", "model.json"):
    shutil.copy2(work / "run" / "model" / f, dst / f)
for f in ("encoder.onnx", "registration.onnx", "manifest.json"):
    shutil.copy2(work / "export" / f, dst / f)
for f in ("metrics.csv", "config.json"):
    shutil.copy2(work / "run" / f, dst / f)
print("copied into", dst)
PY
