#!/usr/bin/env bash
# Reproduces gvsl/assets/default (v2): the small GVSL model shipped with gvsl.
#
#   bash benchmarks/train_default.sh [WORK_DIR] [ITERATIONS]
#
# Data (issue 12): pairs drawn on the fly by the label-map generator from the committed recipe
# gvsl/assets/recipes/default_v2.json (MNI brain, the real chest CT's segments refined by HU,
# k-means clusters of the real brain MR pyradiomics_brain1, random shapes; CT- and MR-like
# appearances, thick slices, bias, noise, crops), 80 % of the pairs; the other 20 % are real MR
# volumes (pyradiomics_brain1 and the bundled 2 mm MNI T1). Held out of training for evaluation
# (the recipe's "held_out"): pyradiomics_brain2 (image and label) and the chest CT as an image.
# GVSL_DATA names the folder of the real volumes (default ../shared/data, SOURCES.md there).
# Licences: gvsl/assets/default/PROVENANCE.md.
# Warm start: the run starts from the weights of the previous default model (v1: MNI MR at 4 mm,
# 3,000 iterations; --init-weights GVSL_INIT, default gvsl/assets/default as committed before v2),
# so a CPU budget of about an hour adapts it to 2 mm, CT and the generator's contrasts instead of
# learning registration from nothing (a run from scratch reached step 50 in that time).
# Training: `gvsl train` on CPU (GVSL_THREADS threads, default 2) with the official objective and
# augmentation (GVSL_SPEC §4), widths 16,32,48,64,96,48,48,32,16 with a 32-wide affine head (so
# that weights + encoder.onnx + registration.onnx stay under 20 MB), at 2 mm with 64^3 patches,
# every input normalised as what it is (--modality auto: CT or MR per volume). Then the export
# and a copy into gvsl/assets/default.
# Re-running with the same WORK_DIR resumes the run (bit-exact on the same machine); a run
# stopped with Ctrl-C is finished by re-running with the step it reached as ITERATIONS.
set -euo pipefail
WORK=${1:-runs/default_v2}
ITERS=${2:-3000}
DATA=${GVSL_DATA:-../shared/data}
export OMP_NUM_THREADS=${GVSL_THREADS:-2}
INIT=${GVSL_INIT:-gvsl/assets/default}

RESUME=(--init-weights "$INIT")
if [ -f "$WORK/run/checkpoints/last.pt" ]; then RESUME=(--resume); fi
gvsl train "$DATA/pyradiomics_brain1_image.nii.gz" gvsl/assets/sample/mni152_2009a_t1_2mm.nii.gz \
    -o "$WORK/run" "${RESUME[@]}" \
    --synth gvsl/assets/recipes/default_v2.json --synth-root "$DATA" --synth-ratio 0.8 \
    --iterations "$ITERS" --batch-size 1 --patch-size 64 \
    --widths 16,32,48,64,96,48,48,32,16 --affine-width 32 --deform-width 16 --restore-width 16 \
    --lr 2e-4 --w-ncc 1 --w-mse 1 --w-smooth 1 --spacing 2 --modality auto \
    --checkpoint-every 20 --log-every 5 --seed 0 --device cpu

gvsl export "$WORK/run" -o "$WORK/export" --verify-shape 1,64,64,64 --force --quiet
python - "$WORK" <<'PY'
import shutil, sys
from pathlib import Path

work = Path(sys.argv[1])
dst = Path("gvsl/assets/default")
dst.mkdir(parents=True, exist_ok=True)
for f in ("model.safetensors", "model.json"):
    shutil.copy2(work / "run" / "model" / f, dst / f)
for f in ("encoder.onnx", "registration.onnx", "refine.onnx", "refine_affine.onnx", "manifest.json"):
    shutil.copy2(work / "export" / f, dst / f)
for f in ("metrics.csv", "config.json"):
    shutil.copy2(work / "run" / f, dst / f)
print("copied into", dst)
PY
