"""The contract between ``gvsl export`` and the runtime: graph I/O names and metadata keys.

An exported graph is self-describing: its ONNX ``metadata_props`` carry the
model configuration, the preprocessing and the patch size, so the runtime
needs nothing but the file. Both sides import the names from here.
"""

from __future__ import annotations

FORMAT = "gvsl-onnx"

#: graph kinds
ENCODER = "encoder"
REGISTRATION = "registration"
REFINE = "refine"
REFINE_AFFINE = "refine_affine"
#: the refine graph of the mutual-information similarity (two modalities): refine.onnx's inputs and outputs
REFINE_MI = "refine_mi"

#: encoder graph: image [N,1,D,H,W] -> embedding [N,C], features [N,F,D,H,W] (optional)
ENCODER_INPUTS = ("image",)
ENCODER_OUTPUTS = ("embedding", "features")

#: registration graph: fixed, moving [N,1,D,H,W] -> affine [N,3,4], dvf [N,3,D,H,W] (fused,
#: voxels, channel a = shift along array axis a), warped [N,1,D,H,W]
REGISTRATION_INPUTS = ("fixed", "moving")
REGISTRATION_OUTPUTS = ("affine", "dvf", "warped")

#: refine graph (no learned weights, gvsl.refine): fixed, moving [1,1,D,H,W], dvf [1,3,D,H,W] (voxels),
#: iterations (int64 scalar), step, regularisation (float [1]), spacing (float [3]: voxel size along
#: D, H, W) -> dvf_refined [1,3,D,H,W], similarity [1]
REFINE_INPUTS = ("fixed", "moving", "dvf", "iterations", "step", "regularisation", "spacing")
REFINE_OUTPUTS = ("dvf_refined", "similarity")
#: affine refine graph: fixed, moving [1,1,D,H,W], matrix [1,3,4] (centred voxel affine: p -> c + M (p - c) + t),
#: iterations (int64 scalar), step (float [1]) -> matrix_refined [1,3,4], similarity [1]
REFINE_AFFINE_INPUTS = ("fixed", "moving", "matrix", "iterations", "step")
REFINE_AFFINE_OUTPUTS = ("matrix_refined", "similarity")
#: inputs that graphs of earlier exports lack (the runtime then does without: isotropic refine levels)
OPTIONAL_INPUTS = {REFINE: ("spacing",), REFINE_MI: ()}
#: the refine graph of each similarity (``RefineOptions.similarity``)
REFINE_KINDS = {"ncc": REFINE, "mi": REFINE_MI}

#: metadata_props keys (values are strings; JSON where structured)
META_FORMAT = "gvsl.format"  # FORMAT
META_KIND = "gvsl.kind"  # ENCODER | REGISTRATION
META_VERSION = "gvsl.version"  # gvsl version that exported it
META_MODEL = "gvsl.model"  # JSON of gvsl.config.ModelConfig.to_dict()
META_PREPROCESS = "gvsl.preprocess"  # JSON of PreprocessConfig.to_dict()
META_PATCH = "gvsl.patch_size"  # JSON [D, H, W]: the training patch (sliding-window size)
META_WEIGHTS_SHA = "gvsl.weights_sha256"  # sha256 of the source weights file
META_PRECISION = "gvsl.precision"  # "fp32" | "fp16"
META_WARP = "gvsl.warp"  # "gather" (TensorRT-buildable) | "grid_sample"
META_DENSE = "gvsl.dense"  # "true" | "false": encoder has the features output
META_REFINE = "gvsl.refine"  # JSON of gvsl.refine.RefineSettings.to_dict(): the refine graph's constants
#: encoder graph: JSON {"mean": [C], "std": [C], "n": int, "source": str} gathered by `gvsl embed-stats`;
#: the runtime returns (raw - mean) / std. Absent on older exports (the raw embedding is returned, with a warning)
META_EMBEDDING_STATS = "gvsl.embedding_stats"
