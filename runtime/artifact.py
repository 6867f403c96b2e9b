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

#: encoder graph: image [N,1,D,H,W] -> embedding [N,C], features [N,F,D,H,W] (optional)
ENCODER_INPUTS = ("image",)
ENCODER_OUTPUTS = ("embedding", "features")

#: registration graph: fixed, moving [N,1,D,H,W] -> affine [N,3,4], dvf [N,3,D,H,W] (fused,
#: voxels, channel a = shift along array axis a), warped [N,1,D,H,W]
REGISTRATION_INPUTS = ("fixed", "moving")
REGISTRATION_OUTPUTS = ("affine", "dvf", "warped")

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
