#!/usr/bin/env bash
# Reproduces gvsl/assets/default: the small GVSL model shipped with gvsl.
#
#   bash benchmarks/train_default.sh [WORK_DIR] [ITERATIONS]
#
# Data: synthetic subjects made by `gvsl synth` from real volumes that ship inside
# Python packages (no download): nilearn's MNI ICBM152 2009a T1 template with its
# grey/white-matter maps, and nibabel's test volumes anatomical.nii (T1 MR) and
# example4d.nii.gz (EPI MR, first frame). Licences: gvsl/assets/default/PROVENANCE.md.
# Training: gvsl's trainer on CPU, widths 16,32,48,64,96,48,48,32,16 with a 32-wide
# affine head (chosen so that weights + encoder.onnx + registration.onnx stay under
# 20 MB), 2 mm, 48^3 patches. Then `gvsl export` and a copy into gvsl/assets/default.
# Re-running with the same WORK_DIR resumes the run (bit-exact on the same machine).
set -euo pipefail
WORK=${1:-runs/default}
ITERS=${2:-600}
NIBDATA=$(python -c "import nibabel, os; print(os.path.join(os.path.dirname(nibabel.__file__), 'tests', 'data'))")

if [ ! -f "$WORK/data/mni/mni_synth.json" ]; then
    gvsl synth -o "$WORK/data/mni" --source mni --n 32 --seed 0 --spacing 2 --prefix mni
    gvsl synth -o "$WORK/data/nib_anat" --source "$NIBDATA/anatomical.nii" --n 2 --seed 100 --spacing 2 --prefix anat
    gvsl synth -o "$WORK/data/nib_epi" --source "$NIBDATA/example4d.nii.gz" --n 2 --seed 200 --spacing 2 --prefix epi
fi

# Label maps are not training data: train on the images only. The trainer is `gvsl train`'s
# own (gvsl.train.train); it is called from Python because the command has no option for
# the head widths, and the official 256-wide affine head alone would exceed the size budget.
python - "$WORK" "$ITERS" <<'PY'
import sys
from pathlib import Path

from gvsl.train import TrainConfig, train

work, iters = sys.argv[1], int(sys.argv[2])
cfg = TrainConfig(
    data=[f"{work}/data/*/*_0[0-9][0-9].nii.gz"],
    out=f"{work}/run",
    iterations=iters,
    batch_size=1,
    patch_size=(48, 48, 48),
    widths=[16, 32, 48, 64, 96, 48, 48, 32, 16],
    affine_width=32,
    deform_width=16,
    restore_width=16,
    lr=5e-4,
    loss={"ncc": 1.0, "mse": 1.0, "smooth": 1.0},
    checkpoint_every=25,
    log_every=5,
    seed=0,
    device="cpu",
    preprocess={"spacing": [2.0, 2.0, 2.0], "modality": "mr"},
)
res = train(cfg, resume=(Path(cfg.out) / "checkpoints" / "last.pt").is_file())
print("steps", res.step, "interrupted", res.interrupted, "final", res.last_metrics)
if res.interrupted:
    sys.exit(130)
PY

gvsl export "$WORK/run" -o "$WORK/export" --verify-shape 1,48,48,48 --force --quiet
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
