"""Where the grounded box is in space, from an aligned depth image and its pinhole intrinsics. No ROS.

    image = DepthImage(data, "16UC1", Intrinsics.from_camera_info_k(k, width, height))
    target = locate_box(image, box_xyxy, colour_size=(640, 480), limits=DepthLimits(0.1, 10.0))
    target.point, target.size                     # metres, camera optical frame

Conventions:
- Depth encodings (sensor_msgs/image_encodings): 16UC1 is millimetres, 32FC1 metres. Zero,
  NaN, infinite and out-of-range values are holes and never used.
- The depth image is aligned to the colour image (same viewpoint); it may have another
  resolution, then the box is scaled by the ratio of the sizes. The intrinsics K are the depth
  image's (its camera_info), K = [fx 0 cx; 0 fy cy; 0 0 1] in pixels.
- Boxes are continuous pixel coordinates (pixel i spans [i, i+1)); K puts the centre of pixel
  i at coordinate i (the ROS/OpenCV camera model), hence the half-pixel shift in `back_project`.
- The camera optical frame: x right, y down, z forward (REP 103), in metres.
- The depth of a box is the median of the valid pixels in its central part (the box shrunk
  about its centre to `central_fraction` of its width and height), which keeps the background
  at the box's edges out; with a mask (H, W bool, colour-image pixels), the mask's pixels
  inside the box instead.
- The size: width and height from the box's extent at that depth; the depth extent is the
  spread (10th to 90th percentile) of the valid depths in the region, the visible part only.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# encoding -> metres per stored unit
DEPTH_ENCODINGS = {"16UC1": 0.001, "32FC1": 1.0}
DEPTH_DTYPES = {"16UC1": np.uint16, "32FC1": np.float32}
SPREAD_PERCENTILES = (10.0, 90.0)


class DepthError(ValueError):
    """A depth image or camera_info that cannot be used; the message says what and what to do."""


@dataclass(frozen=True)
class Intrinsics:
    fx: float
    fy: float
    cx: float
    cy: float
    width: int  # of the image these intrinsics describe; 0 = not stated
    height: int

    @classmethod
    def from_camera_info_k(cls, k: Sequence[float], width: int, height: int) -> "Intrinsics":
        """From sensor_msgs/CameraInfo's row-major 3x3 K and image size."""
        k = [float(v) for v in k]
        if len(k) != 9:
            raise DepthError(f"camera_info K must have 9 values, got {len(k)}")
        fx, fy, cx, cy = k[0], k[4], k[2], k[5]
        if not (fx > 0 and fy > 0 and np.isfinite([fx, fy, cx, cy]).all()):
            raise DepthError(f"camera_info K has no usable focal lengths (fx={fx}, fy={fy}): is the camera calibrated?")
        return cls(fx, fy, cx, cy, int(width), int(height))


@dataclass(frozen=True)
class DepthImage:
    data: np.ndarray  # (H, W) uint16 (16UC1) or float32 (32FC1), as stored in the message
    encoding: str
    intrinsics: Intrinsics

    def __post_init__(self) -> None:
        if self.encoding not in DEPTH_ENCODINGS:
            raise DepthError(
                f"depth encoding '{self.encoding}' is not supported: publish aligned depth as 16UC1 (millimetres) "
                "or 32FC1 (metres)"
            )
        if self.data.ndim != 2 or self.data.dtype != DEPTH_DTYPES[self.encoding]:
            raise DepthError(
                f"depth data must be a (H, W) {np.dtype(DEPTH_DTYPES[self.encoding]).name} array for "
                f"{self.encoding}, got {self.data.dtype} {self.data.shape}"
            )
        intrinsics = self.intrinsics
        if intrinsics.width and (intrinsics.width, intrinsics.height) != (self.data.shape[1], self.data.shape[0]):
            raise DepthError(
                f"camera_info is for {intrinsics.width}x{intrinsics.height} images but the depth image is "
                f"{self.data.shape[1]}x{self.data.shape[0]}: use the camera_info published with the aligned depth"
            )


@dataclass(frozen=True)
class DepthLimits:
    min_m: float  # nearer values are holes (sensor minimum range)
    max_m: float  # farther values are holes
    central_fraction: float = 0.5  # part of the box (each side) whose depths are used without a mask
    min_valid_pixels: int = 10  # fewer valid pixels: no depth for this box


@dataclass(frozen=True)
class Target3D:
    point: tuple[float, float, float]  # the box centre at its depth, metres, camera optical frame
    size: tuple[float, float, float]  # width (x), height (y), visible depth extent (z), metres
    valid_pixels: int  # depth pixels the estimate rests on


def to_metres(data: np.ndarray, encoding: str) -> np.ndarray:
    """Stored depth (any shape) -> float32 metres; zero, NaN and infinite values become NaN."""
    metres = data.astype(np.float32) * np.float32(DEPTH_ENCODINGS[encoding])
    metres[~np.isfinite(metres) | (metres <= 0)] = np.nan
    return metres


def box_depths(image: DepthImage, box_xyxy: Sequence[float], limits: DepthLimits,
               mask: np.ndarray | None = None) -> np.ndarray:
    """The valid depths (metres, (N,)) of the region that stands for the box, in depth-image pixels."""
    height, width = image.data.shape
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    if mask is None:
        shrink_x = (x2 - x1) * (1.0 - limits.central_fraction) / 2
        shrink_y = (y2 - y1) * (1.0 - limits.central_fraction) / 2
        x1, x2, y1, y2 = x1 + shrink_x, x2 - shrink_x, y1 + shrink_y, y2 - shrink_y
    # Pixels whose centres lie inside the region; at least the one under the region's centre.
    col_low, col_high = max(0, int(np.ceil(x1 - 0.5))), min(width, int(np.ceil(x2 - 0.5)))
    row_low, row_high = max(0, int(np.ceil(y1 - 0.5))), min(height, int(np.ceil(y2 - 0.5)))
    if col_high <= col_low or row_high <= row_low:
        col = min(width - 1, max(0, int((x1 + x2) / 2)))
        row = min(height - 1, max(0, int((y1 + y2) / 2)))
        col_low, col_high, row_low, row_high = col, col + 1, row, row + 1
    depths = to_metres(image.data[row_low:row_high, col_low:col_high], image.encoding)  # (h, w)
    if mask is not None:
        if mask.shape != image.data.shape:
            raise DepthError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the depth image is {width}x{height}")
        depths = np.where(mask[row_low:row_high, col_low:col_high], depths, np.nan)
    with np.errstate(invalid="ignore"):
        valid = (depths >= limits.min_m) & (depths <= limits.max_m)  # NaN compares False
    return depths[valid]


def back_project(u: float, v: float, depth_m: float, intrinsics: Intrinsics) -> tuple[float, float, float]:
    """Continuous pixel coordinates (u, v) at depth z -> (x, y, z) metres in the optical frame."""
    x = (u - 0.5 - intrinsics.cx) * depth_m / intrinsics.fx
    y = (v - 0.5 - intrinsics.cy) * depth_m / intrinsics.fy
    return x, y, depth_m


def locate_box(image: DepthImage, box_xyxy: Sequence[float], colour_size: tuple[int, int], limits: DepthLimits,
               mask: np.ndarray | None = None) -> Target3D | None:
    """The box (colour-image pixels; colour_size = (width, height)) in space, or None when too few
    valid depth pixels cover it. `mask` (colour-image pixels, (H, W) bool) narrows the region."""
    height, width = image.data.shape
    scale_x, scale_y = width / colour_size[0], height / colour_size[1]
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    box = (x1 * scale_x, y1 * scale_y, x2 * scale_x, y2 * scale_y)  # depth-image pixels
    if mask is not None and mask.shape != (height, width):
        rows = (np.arange(height) / scale_y).astype(int).clip(0, mask.shape[0] - 1)
        cols = (np.arange(width) / scale_x).astype(int).clip(0, mask.shape[1] - 1)
        mask = mask[rows[:, None], cols[None, :]]  # nearest-neighbour to the depth image's size
    depths = box_depths(image, box, limits, mask)  # (N,)
    if depths.size < limits.min_valid_pixels:
        return None
    depth_m = float(np.median(depths))
    intrinsics = image.intrinsics
    point = back_project((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, depth_m, intrinsics)
    low, high = np.percentile(depths, SPREAD_PERCENTILES)
    size = ((box[2] - box[0]) * depth_m / intrinsics.fx, (box[3] - box[1]) * depth_m / intrinsics.fy, float(high - low))
    return Target3D(point=point, size=size, valid_pixels=int(depths.size))


@dataclass(frozen=True)
class RigidTransform:
    """A frame change, as tf2 gives it: p_target = R(rotation) p_source + translation."""

    translation: tuple[float, float, float]  # metres
    rotation_xyzw: tuple[float, float, float, float]  # unit quaternion

    def apply(self, point: Sequence[float]) -> tuple[float, float, float]:
        x, y, z, w = self.rotation_xyzw
        rotation = np.array([  # (3, 3) from the unit quaternion
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ])
        moved = rotation @ np.asarray(point, dtype=np.float64) + np.asarray(self.translation, dtype=np.float64)
        return float(moved[0]), float(moved[1]), float(moved[2])
