"""csref_ros.depth against the analytic answer: a box-shaped object in front of a wall, seen by
a pinhole camera with known intrinsics."""

import numpy as np
import pytest

from csref_ros.depth import DepthError, DepthImage, DepthLimits, Intrinsics, RigidTransform, back_project, locate_box, to_metres

WIDTH, HEIGHT = 640, 480
INTRINSICS = Intrinsics(fx=500.0, fy=520.0, cx=319.5, cy=239.5, width=WIDTH, height=HEIGHT)
OBJECT_M, WALL_M = 0.8, 1.5
BOX = (200.0, 100.0, 300.0, 220.0)  # x1, y1, x2, y2 in colour pixels
LIMITS = DepthLimits(min_m=0.1, max_m=10.0)


def scene_metres(box=BOX, margin: int = 8) -> np.ndarray:
    """(H, W) metres: the wall, and the object filling the box but for a margin of wall at its edges."""
    depth = np.full((HEIGHT, WIDTH), WALL_M, dtype=np.float32)
    x1, y1, x2, y2 = (int(v) for v in box)
    depth[y1 + margin:y2 - margin, x1 + margin:x2 - margin] = OBJECT_M
    return depth


def encoded(metres: np.ndarray, encoding: str) -> np.ndarray:
    if encoding == "16UC1":
        return np.nan_to_num(np.round(metres * 1000), nan=0).astype(np.uint16)
    return metres.astype(np.float32)


def expected_point(box=BOX, depth_m: float = OBJECT_M, intrinsics: Intrinsics = INTRINSICS) -> tuple[float, float, float]:
    u, v = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    # Pixel i's centre is at i + 0.5 in box coordinates and at i in K's.
    return ((u - 0.5 - intrinsics.cx) * depth_m / intrinsics.fx, (v - 0.5 - intrinsics.cy) * depth_m / intrinsics.fy, depth_m)


@pytest.mark.parametrize("encoding", ["16UC1", "32FC1"])
def test_point_and_size_match_the_pinhole_model(encoding):
    image = DepthImage(encoded(scene_metres(), encoding), encoding, INTRINSICS)
    target = locate_box(image, BOX, (WIDTH, HEIGHT), LIMITS)
    assert target is not None
    np.testing.assert_allclose(target.point, expected_point(), atol=1e-6)
    np.testing.assert_allclose(target.size[:2], (100 * OBJECT_M / 500.0, 120 * OBJECT_M / 520.0), atol=1e-6)
    assert target.size[2] == pytest.approx(0.0, abs=1e-6)  # the central part sees only the object's flat face
    assert target.valid_pixels == 50 * 60


@pytest.mark.parametrize("encoding", ["16UC1", "32FC1"])
def test_holes_are_ignored(encoding):
    metres = scene_metres()
    rng = np.random.default_rng(0)
    holes = rng.random(metres.shape) < 0.4
    metres[holes] = np.nan if encoding == "32FC1" else 0.0
    if encoding == "32FC1":
        metres[rng.random(metres.shape) < 0.05] = np.inf
    data = encoded(metres, encoding)
    target = locate_box(DepthImage(data, encoding, INTRINSICS), BOX, (WIDTH, HEIGHT), LIMITS)
    np.testing.assert_allclose(target.point, expected_point(), atol=1e-6)
    assert 0 < target.valid_pixels < 50 * 60


def test_out_of_range_depths_are_ignored():
    metres = scene_metres(margin=0)
    metres[130:190, 225:275] = 12.0  # beyond max_m: e.g. a reflection measured as far away
    metres[190:220, 200:300] = 0.05  # nearer than min_m, outside the central part anyway
    target = locate_box(DepthImage(metres, "32FC1", INTRINSICS), BOX, (WIDTH, HEIGHT), LIMITS)
    assert target is None  # the central part (rows 130..189, columns 225..274) is all out of range
    metres[130:190, 225:250] = OBJECT_M
    target = locate_box(DepthImage(metres, "32FC1", INTRINSICS), BOX, (WIDTH, HEIGHT), LIMITS)
    assert target.point[2] == pytest.approx(OBJECT_M)
    assert target.valid_pixels == 60 * 25


def test_mask_selects_the_object_where_the_box_centre_shows_the_wall():
    metres = np.full((HEIGHT, WIDTH), WALL_M, dtype=np.float32)
    metres[100:220, 200:230] = OBJECT_M  # a thin object along the box's left edge
    image = DepthImage(encoded(metres, "16UC1"), "16UC1", INTRINSICS)
    without_mask = locate_box(image, BOX, (WIDTH, HEIGHT), LIMITS)
    assert without_mask.point[2] == pytest.approx(WALL_M)
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[100:220, 200:230] = True
    with_mask = locate_box(image, BOX, (WIDTH, HEIGHT), LIMITS, mask=mask)
    np.testing.assert_allclose(with_mask.point, expected_point(), atol=1e-6)
    assert with_mask.valid_pixels == 120 * 30


def test_depth_at_half_resolution_gives_the_same_point():
    # The same camera at half resolution: pixel centres at (i + 0.5) / 2 - 0.5 in the full image's K.
    half = Intrinsics(fx=250.0, fy=260.0, cx=159.5, cy=119.5, width=WIDTH // 2, height=HEIGHT // 2)
    metres = scene_metres()[::2, ::2].copy()
    target = locate_box(DepthImage(metres, "32FC1", half), BOX, (WIDTH, HEIGHT), LIMITS)
    np.testing.assert_allclose(target.point, expected_point(), atol=1e-6)


def test_a_box_without_valid_depth_has_no_target():
    metres = np.zeros((HEIGHT, WIDTH), dtype=np.uint16)
    assert locate_box(DepthImage(metres, "16UC1", INTRINSICS), BOX, (WIDTH, HEIGHT), LIMITS) is None


def test_to_metres_units_and_holes():
    np.testing.assert_allclose(to_metres(np.array([0, 1, 1500], dtype=np.uint16), "16UC1"), [np.nan, 0.001, 1.5])
    np.testing.assert_allclose(to_metres(np.array([0, np.nan, -1, np.inf, 2.5], dtype=np.float32), "32FC1"),
                               [np.nan, np.nan, np.nan, np.nan, 2.5])


def test_back_project_principal_point_is_on_the_axis():
    assert back_project(INTRINSICS.cx + 0.5, INTRINSICS.cy + 0.5, 2.0, INTRINSICS) == (0.0, 0.0, 2.0)


def test_bad_inputs_say_what_to_do():
    with pytest.raises(DepthError, match="16UC1 \\(millimetres\\) or 32FC1"):
        DepthImage(np.zeros((4, 4), np.uint8), "mono8", INTRINSICS)
    with pytest.raises(DepthError, match="uint16"):
        DepthImage(np.zeros((4, 4), np.float32), "16UC1", INTRINSICS)
    with pytest.raises(DepthError, match="camera_info is for 640x480"):
        DepthImage(np.zeros((240, 320), np.float32), "32FC1", INTRINSICS)
    with pytest.raises(DepthError, match="calibrated"):
        Intrinsics.from_camera_info_k([0.0] * 9, WIDTH, HEIGHT)
    k = [500.0, 0.0, 319.5, 0.0, 520.0, 239.5, 0.0, 0.0, 1.0]
    assert Intrinsics.from_camera_info_k(k, WIDTH, HEIGHT) == INTRINSICS


def test_rigid_transform_of_the_optical_frame_into_a_robot_frame():
    # Optical (x right, y down, z forward) -> a body frame (x forward, y left, z up), camera 1 m up.
    half = np.sqrt(0.5)
    optical_to_body = RigidTransform(translation=(0.0, 0.0, 1.0), rotation_xyzw=(-0.5, 0.5, -0.5, 0.5))
    np.testing.assert_allclose(optical_to_body.apply((0.0, 0.0, 2.0)), (2.0, 0.0, 1.0), atol=1e-12)
    np.testing.assert_allclose(optical_to_body.apply((0.5, 0.25, 2.0)), (2.0, -0.5, 0.75), atol=1e-12)
    quarter_turn = RigidTransform(translation=(1.0, 0.0, 0.0), rotation_xyzw=(0.0, 0.0, half, half))  # about z
    np.testing.assert_allclose(quarter_turn.apply((1.0, 0.0, 0.0)), (1.0, 1.0, 0.0), atol=1e-12)
