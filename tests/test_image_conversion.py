"""Image conversion on real sensor_msgs messages: encodings, padding, byte order, bad input."""

import cv2
import numpy as np
import pytest
import torch
from sensor_msgs.msg import CompressedImage, Image

from csref_model.mask_head import mask_to_original
from csref_model.preprocessing import letterbox_geometry
from csref_ros.image_conversion import (
    ImageConversionError,
    compressed_image_to_rgb,
    depth_image_array,
    fill_image,
    image_to_array,
    image_to_rgb,
    mask_to_mono8,
)

HEIGHT, WIDTH = 37, 53  # odd sizes so that row padding and strides matter


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)


def padded_image_msg(pixels: np.ndarray, encoding: str, padding: int, bigendian: bool = False) -> Image:
    """An Image whose rows are followed by `padding` junk bytes, built by hand (not by fill_image)."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.dtype.itemsize > 1:
        pixels = pixels.astype(pixels.dtype.newbyteorder(">" if bigendian else "<"))
    row_bytes = pixels.shape[1] * pixels.shape[2] * pixels.itemsize
    rows = pixels.reshape(pixels.shape[0], -1).view(np.uint8).reshape(pixels.shape[0], row_bytes)
    junk = np.full((pixels.shape[0], padding), 0xAB, dtype=np.uint8)
    msg = Image()
    msg.height, msg.width = pixels.shape[:2]
    msg.encoding = encoding
    msg.is_bigendian = int(bigendian)
    msg.step = row_bytes + padding
    msg.data = np.concatenate([rows, junk], axis=1).tobytes()
    return msg


def encoded(rgb: np.ndarray, encoding: str) -> np.ndarray:
    """The RGB test picture in `encoding`'s memory layout."""
    alpha = np.full(rgb.shape[:2] + (1,), 200, dtype=np.uint8)
    gray = rgb[:, :, 0]
    return {
        "rgb8": rgb,
        "bgr8": rgb[:, :, ::-1],
        "rgba8": np.concatenate([rgb, alpha], axis=2),
        "bgra8": np.concatenate([rgb[:, :, ::-1], alpha], axis=2),
        "mono8": gray,
        "mono16": gray.astype(np.uint16) * 256 + 0x5A,  # high byte == gray, low byte distinct
    }[encoding]


def expected_rgb(rgb: np.ndarray, encoding: str) -> np.ndarray:
    if encoding.startswith("mono"):
        return np.repeat(rgb[:, :, :1], 3, axis=2)
    return rgb


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16"])
@pytest.mark.parametrize("padding", [0, 7])
@pytest.mark.parametrize("bigendian", [False, True])
def test_every_encoding_with_padding_and_byte_order(rgb, encoding, padding, bigendian):
    msg = padded_image_msg(encoded(rgb, encoding), encoding, padding, bigendian)
    result = image_to_rgb(msg)
    assert result.shape == (HEIGHT, WIDTH, 3) and result.dtype == np.uint8
    np.testing.assert_array_equal(result, expected_rgb(rgb, encoding))


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"])
def test_eight_bit_encodings_are_views_of_the_message_buffer(rgb, encoding):
    msg = padded_image_msg(encoded(rgb, encoding), encoding, padding=5)
    assert np.shares_memory(image_to_rgb(msg), np.frombuffer(msg.data, dtype=np.uint8))


def test_mono16_keeps_full_precision_in_native_array(rgb):
    depth = encoded(rgb, "mono16")
    for bigendian in (False, True):
        msg = padded_image_msg(depth, "mono16", padding=2, bigendian=bigendian)
        np.testing.assert_array_equal(image_to_array(msg)[:, :, 0], depth)


@pytest.mark.parametrize("encoding", ["16UC1", "32FC1"])
def test_depth_images_in_either_byte_order_with_padding(encoding):
    rng = np.random.default_rng(1)
    depth = rng.integers(0, 10_000, size=(HEIGHT, WIDTH)).astype(np.uint16 if encoding == "16UC1" else np.float32)
    if encoding == "32FC1":
        depth = depth / 1000 + np.float32(1e-4)
        depth[0, :3] = np.nan
    for bigendian in (False, True):
        array = depth_image_array(padded_image_msg(depth, encoding, padding=4, bigendian=bigendian))
        assert array.dtype == depth.dtype and array.dtype.isnative and array.shape == (HEIGHT, WIDTH)
        np.testing.assert_array_equal(array, depth)
    with pytest.raises(ImageConversionError, match="16UC1 \\(millimetres\\) or 32FC1"):
        depth_image_array(padded_image_msg(np.zeros((HEIGHT, WIDTH), np.uint16), "mono16", padding=0))
    filled = Image()
    fill_image(filled, depth, encoding)
    np.testing.assert_array_equal(depth_image_array(filled), depth)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16"])
def test_fill_image_round_trip(rgb, encoding):
    msg = Image()
    fill_image(msg, encoded(rgb, encoding), encoding)
    assert msg.step == WIDTH * {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "mono16": 2}[encoding]
    assert len(msg.data) == msg.step * HEIGHT
    np.testing.assert_array_equal(image_to_rgb(msg), expected_rgb(rgb, encoding))


def test_fill_image_rejects_array_that_does_not_fit_encoding(rgb):
    with pytest.raises(ImageConversionError, match=r"needs \(H, W, 4\) uint8"):
        fill_image(Image(), rgb, "rgba8")


def raw_msg(**fields) -> Image:
    msg = Image(height=4, width=5, encoding="rgb8", step=15, data=bytes(60))
    for name, value in fields.items():
        setattr(msg, name, value)
    return msg


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"encoding": "yuv422"}, "encoding 'yuv422' is not supported; supported: rgb8, bgr8"),
        ({"encoding": "32FC1"}, "not supported"),
        ({"data": bytes(59)}, r"truncated: 59 bytes .* \(expected 60\)"),
        ({"data": bytes(0)}, "truncated"),
        ({"step": 14, "data": bytes(56)}, r"step 14 is smaller than one row .* \(15 bytes\)"),
        ({"step": 16}, r"60 bytes for 4 rows of step 16 \(expected 64\); the message was cut or step/height are wrong"),
        ({"data": bytes(61)}, "step or height do not match"),
        ({"height": 0, "width": 0, "step": 0, "data": b""}, r"empty \(0x0 pixels\)"),
        ({"height": 8000, "width": 8000, "step": 24000, "data": b""}, "8000x8000 = 64000000 pixels exceeds"),
    ],
)
def test_bad_raw_images_raise_clear_errors(fields, message):
    with pytest.raises(ImageConversionError, match=message):
        image_to_rgb(raw_msg(**fields))


def test_max_pixels_is_configurable():
    msg = raw_msg()
    assert image_to_rgb(msg, max_pixels=20).shape == (4, 5, 3)
    with pytest.raises(ImageConversionError, match="limit of 19 pixels"):
        image_to_rgb(msg, max_pixels=19)


def compressed_msg(pixels_rgb: np.ndarray, extension: str, image_format: str) -> CompressedImage:
    ok, data = cv2.imencode(extension, cv2.cvtColor(pixels_rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return CompressedImage(format=image_format, data=data.tobytes())


def test_png_round_trip_is_exact(rgb):
    msg = compressed_msg(rgb, ".png", "rgb8; png compressed bgr8")
    np.testing.assert_array_equal(compressed_image_to_rgb(msg), rgb)


def test_jpeg_decodes_to_rgb():
    smooth = np.zeros((64, 96, 3), dtype=np.uint8)
    smooth[:, :48] = (220, 30, 30)  # red left half, blue right half
    smooth[:, 48:] = (30, 30, 220)
    decoded = compressed_image_to_rgb(compressed_msg(smooth, ".jpg", "jpeg"))
    assert decoded.shape == (64, 96, 3)
    assert np.abs(decoded[:, 4:44].astype(int) - smooth[:, 4:44]).max() < 12
    assert np.abs(decoded[:, 52:92].astype(int) - smooth[:, 52:92]).max() < 12


@pytest.mark.parametrize("extension", [".png", ".jpg"])
def test_truncated_compressed_image_is_rejected(rgb, extension):
    msg = compressed_msg(rgb, extension, extension[1:])
    msg.data = bytes(msg.data)[: len(msg.data) // 2]
    with pytest.raises(ImageConversionError, match="truncated"):
        compressed_image_to_rgb(msg)


@pytest.mark.parametrize("extension", [".png", ".jpg"])
def test_huge_compressed_image_is_rejected_before_decoding(extension):
    huge = np.zeros((8000, 8000), dtype=np.uint8)
    ok, data = cv2.imencode(extension, huge)
    assert ok
    msg = CompressedImage(format=extension[1:], data=data.tobytes())
    with pytest.raises(ImageConversionError, match="8000x8000 = 64000000 pixels exceeds"):
        compressed_image_to_rgb(msg)


def test_unsupported_or_garbage_compressed_data():
    with pytest.raises(ImageConversionError, match="format 'h264' is not supported"):
        compressed_image_to_rgb(CompressedImage(format="h264", data=b"\x00\x00\x00\x01"))
    with pytest.raises(ImageConversionError, match="no readable PNG/JPEG header"):
        compressed_image_to_rgb(CompressedImage(format="jpeg", data=b"not an image at all"))


@pytest.mark.parametrize("height, width", [(480, 640), (720, 405)])
def test_model_mask_to_a_camera_resolution_mono8_image(height, width):
    # A disc in a camera frame, as the model sees it: letterboxed to 256 and pooled to the mask
    # head's stride-4 grid as two-class logits. Back through mask_to_original (the Grounder's
    # step) and mask_to_mono8 into a real mono8 Image, it must cover the disc at camera resolution.
    truth = np.zeros((height, width), dtype=np.uint8)
    cv2.circle(truth, (width // 3, height // 2), min(height, width) // 5, 1, -1)
    geometry = letterbox_geometry(height, width, 256)
    canvas = np.zeros((256, 256), dtype=np.float32)
    canvas[geometry.dy:geometry.dy + geometry.nh, geometry.dx:geometry.dx + geometry.nw] = cv2.resize(
        truth, (geometry.nw, geometry.nh), interpolation=cv2.INTER_NEAREST)
    coarse = torch.nn.functional.avg_pool2d(torch.from_numpy(canvas)[None, None], 4)[0, 0]  # (64, 64)
    mask = mask_to_original(torch.stack([0.5 - coarse, coarse - 0.5]), geometry)  # (height, width) bool
    msg = Image()
    fill_image(msg, mask_to_mono8(mask, width, height), "mono8")
    assert (msg.height, msg.width, msg.encoding) == (height, width, "mono8")
    pixels = image_to_array(msg)[:, :, 0]
    assert set(np.unique(pixels)) == {0, 255}
    target = pixels == 255
    assert (target & (truth == 1)).sum() / (target | (truth == 1)).sum() > 0.9
    # Grounded on a frame scaled to half size: the mask comes back to the camera's resolution.
    half = mask_to_mono8(mask[::2, ::2], width, height)
    assert half.shape == (height, width) and ((half == 255) == target).mean() > 0.98
    with pytest.raises(ValueError, match=r"\(H, W\) array"):
        mask_to_mono8(np.zeros((2, 2, 3), dtype=bool), width, height)
