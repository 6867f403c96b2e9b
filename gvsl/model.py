"""The GVSL network: 3D U-Net backbone, Z-matching head, restoration head.

Module and parameter names follow the authors' release exactly, so an
official ``GVSL_epoch_*.pth`` state_dict loads into :class:`GVSL` with default
widths (``gvsl.io.load_official``). Two deliberate differences from the
release (GVSL_SPEC.md §5): the affine matrix is built with batched tensor ops
so the affine head trains and any batch size works, and nothing pins a
device. ``forward`` does no shape-dependent padding (inputs must be multiples
of 16; :mod:`gvsl.runtime.preprocess` pads), which keeps the graph exportable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gvsl.config import SIZE_MULTIPLE, ModelConfig
from gvsl.spatial import (
    ROT_RANGE,
    SCALE_RANGE,
    SHEAR_RANGE,
    affine_from_params,
    affine_warp,
    compose_affine_dvf,
    dvf_warp,
)

__all__ = ["GVSL", "GVSLOutput", "UNet3D", "check_spatial_size"]


def check_spatial_size(shape: tuple[int, ...] | torch.Size) -> None:
    """Raise ValueError unless every spatial size is a positive multiple of 16."""
    spatial = tuple(int(s) for s in shape[-3:])
    if len(shape) != 5 or any(s <= 0 or s % SIZE_MULTIPLE for s in spatial):
        raise ValueError(
            f"GVSL takes [N, C, D, H, W] inputs whose D, H, W are multiples of {SIZE_MULTIPLE}; "
            f"got {tuple(shape)} (pad with gvsl.runtime.preprocess.pad_to_multiple)"
        )


class DoubleConv(nn.Sequential):
    """(Conv3d 3x3x3 -> GroupNorm(out/8) -> LeakyReLU(0.2)) x 2, as ``double_conv.0..5``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv3d(cin, cout, 3, padding=1),
            nn.GroupNorm(cout // 8, cout),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1),
            nn.GroupNorm(cout // 8, cout),
            nn.LeakyReLU(0.2, inplace=True),
        )


class Down(nn.Module):
    """MaxPool3d(2) then DoubleConv (``maxpool_conv.1``)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool3d(2), DoubleConv(cin, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Trilinear x2 (align_corners=True), concat [skip, upsampled], DoubleConv."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = DoubleConv(cin, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="trilinear", align_corners=True)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet3D(nn.Module):
    """GVSL backbone N_theta: returns (global f^g = bottleneck, local f^l = last decoder map)."""

    def __init__(self, widths: tuple[int, ...], in_channels: int = 1) -> None:
        super().__init__()
        c = widths
        self.inc = DoubleConv(in_channels, c[0])
        self.down1 = Down(c[0], c[1])
        self.down2 = Down(c[1], c[2])
        self.down3 = Down(c[2], c[3])
        self.down4 = Down(c[3], c[4])
        self.up1 = Up(c[4] + c[3], c[5])
        self.up2 = Up(c[5] + c[2], c[6])
        self.up3 = Up(c[6] + c[1], c[7])
        self.up4 = Up(c[7] + c[0], c[8])
        for m in self.modules():  # the authors' backbone init
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        y = self.up1(x5, x4)
        y = self.up2(y, x3)
        y = self.up3(y, x2)
        y = self.up4(y, x1)
        return x5, y


@dataclass
class GVSLOutput:
    """Everything one GVSL training forward produces (A = fixed, B = moving)."""

    restored: torch.Tensor  # R(f^l_A)            [N, 1, D, H, W]
    warped: torch.Tensor  # B warped onto A       [N, 1, D, H, W]
    affine: torch.Tensor  # psi^g [N, 3, 4], in config.affine_convention
    local_dvf: torch.Tensor  # psi^l, voxels       [N, 3, D, H, W]


class GVSL(nn.Module):
    """GVSL: backbone ``unet`` + Z-matching head (affine + deformable) + ``res_conv``."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = config or ModelConfig()
        self.config = cfg
        c = cfg.widths
        self.unet = UNet3D(c, cfg.in_channels)
        self.f_conv = DoubleConv(2 * c[4], cfg.affine_width)
        self.sp_conv = DoubleConv(2 * c[8], cfg.deform_width)
        r = cfg.restore_width
        self.res_conv = nn.Sequential(
            nn.Conv3d(c[8], r, 3, padding=1),
            nn.GroupNorm(r // 4, r),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv3d(r, cfg.in_channels, 1),
        )
        self.out_flow = nn.Conv3d(cfg.deform_width, 3, 3, padding=1)
        self.fc_rot = nn.Linear(cfg.affine_width, 3)
        self.fc_scl = nn.Linear(cfg.affine_width, 3)
        self.fc_trans = nn.Linear(cfg.affine_width, 3)
        self.fc_shear = nn.Linear(cfg.affine_width, 6)

    # -- parts -------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features (global ``[N, C4, D/16, H/16, W/16]``, local ``[N, C8, D, H, W]``)."""
        check_spatial_size(x.shape)
        return self.unet(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Global embedding: average pool of the bottleneck, ``[N, C4]``."""
        return self.encode(x)[0].mean(dim=(2, 3, 4))

    def restore(self, f_local: torch.Tensor) -> torch.Tensor:
        """Restoration head R on local features."""
        return self.res_conv(f_local)

    def affine_head(self, fg_moving: torch.Tensor, fg_fixed: torch.Tensor) -> torch.Tensor:
        """Affine psi^g ``[N, 3, 4]`` from global features (moving first, as the release),
        read in ``config.affine_convention`` (:func:`gvsl.spatial.affine_to_voxel`)."""
        h = self.f_conv(torch.cat([fg_moving, fg_fixed], dim=1)).mean(dim=(2, 3, 4))
        rot = torch.clamp(self.fc_rot(h), -1, 1) * ROT_RANGE
        scl = torch.clamp(self.fc_scl(h), -1, 1) * SCALE_RANGE + 1
        shear = torch.clamp(self.fc_shear(h), -1, 1) * SHEAR_RANGE
        return affine_from_params(rot, scl, self.fc_trans(h), shear)

    def deform_head(
        self,
        fl_moving: torch.Tensor,
        fl_fixed: torch.Tensor,
        affine: torch.Tensor | None,
        sampler: str = "grid_sample",
    ) -> torch.Tensor:
        """Local DVF psi^l (voxels) from affinely aligned local features.

        ``sampler`` (see :data:`gvsl.spatial.SAMPLERS`) only changes how the
        warp is computed: ``"gather"`` makes the graph TensorRT-buildable.
        ``affine=None`` is the identity: the features are used as they are.
        """
        aligned = fl_moving if affine is None else affine_warp(
            fl_moving, affine, sampler=sampler, convention=self.config.affine_convention
        )
        return self.out_flow(self.sp_conv(torch.cat([aligned, fl_fixed], dim=1)))

    def match(
        self,
        fixed_feats: tuple[torch.Tensor, torch.Tensor],
        moving_feats: tuple[torch.Tensor, torch.Tensor],
        sampler: str = "grid_sample",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Z-matching head: (affine ``[N,3,4]``, local DVF ``[N,3,D,H,W]``)."""
        affine = self.affine_head(moving_feats[0], fixed_feats[0])
        return affine, self.deform_head(moving_feats[1], fixed_feats[1], affine, sampler=sampler)

    # -- whole passes ------------------------------------------------------
    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> GVSLOutput:
        """Training pass: A = ``fixed`` (the damaged view), B = ``moving``."""
        if fixed.shape != moving.shape:
            raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} differ")
        fa = self.encode(fixed)
        fb = self.encode(moving)
        affine, local = self.match(fa, fb)
        warped = dvf_warp(affine_warp(moving, affine, convention=self.config.affine_convention), local)
        return GVSLOutput(self.restore(fa[1]), warped, affine, local)

    def register(
        self, fixed: torch.Tensor, moving: torch.Tensor, sampler: str = "grid_sample"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inference registration: (affine, fused DVF in voxels, moving warped once by it).

        With ``config.affine_head == "identity"`` the affine is the identity and
        the fused DVF is the deformable head's alone.
        """
        fixed_feats, moving_feats = self.encode(fixed), self.encode(moving)
        if self.config.affine_head == "identity":
            affine = torch.eye(3, 4, dtype=fixed.dtype, device=fixed.device).expand(fixed.shape[0], 3, 4)
            fused = self.deform_head(moving_feats[1], fixed_feats[1], None, sampler=sampler)
        else:
            affine, local = self.match(fixed_feats, moving_feats, sampler=sampler)
            fused = compose_affine_dvf(affine, local, self.config.affine_convention)
        return affine, fused, dvf_warp(moving, fused, sampler=sampler)
