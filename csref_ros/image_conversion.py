"""sensor_msgs/Image and CompressedImage <-> numpy, without cv_bridge.

The functions read the message fields by attribute (height, width, encoding, is_bigendian,
step, data / format, data), so they work on rclpy messages and on any object with those
fields, and the module needs no ROS import.

Raw images are returned as views of the message buffer where the layout allows it (row padding
is skipped by slicing, channel order by negative strides), so a 1280x720 rgb8 frame costs no
copy. Views are read-only when the message buffer is; call np.ascontiguousarray before handing
them to code that needs contiguous memory.
"""

import struct
from dataclasses import dataclass

import cv2
import numpy as np

# Largest image accepted by default: 8K UHD. Bigger frames are almost certainly a wrong camera
# setting and would cost hundreds of MB per frame in the queues.
DEFAULT_MAX_PIXELS = 7680 * 4320


class ImageConversionError(ValueError):
    """An image message that cannot be turned into pixels; the message says why."""


@dataclass(frozen=True)
class PixelLayout:
    channels: int
    dtype: type
    is_bgr: bool  # blue first in memory

    @property
    def bytes_per_pixel(self) -> int:
        return self.channels * np.dtype(self.dtype).itemsize


ENCODINGS: dict[str, PixelLayout] = {
    "rgb8": PixelLayout(3, np.uint8, is_bgr=False),
    "bgr8": PixelLayout(3, np.uint8, is_bgr=True),
    "rgba8": PixelLayout(4, np.uint8, is_bgr=False),
    "bgra8": PixelLayout(4, np.uint8, is_bgr=True),
    "mono8": PixelLayout(1, np.uint8, is_bgr=False),
    "mono16": PixelLayout(1, np.uint16, is_bgr=False),
}
# Depth images (csref_ros.depth): 16UC1 in millimetres, 32FC1 in metres.
DEPTH_ENCODINGS: dict[str, PixelLayout] = {
    "16UC1": PixelLayout(1, np.uint16, is_bgr=False),
    "32FC1": PixelLayout(1, np.float32, is_bgr=False),
}


def check_image_size(height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    if height <= 0 or width <= 0:
        raise ImageConversionError(f"image is empty ({width}x{height} pixels); the camera sent no pixels")
    if height * width > max_pixels:
        raise ImageConversionError(
            f"image of {width}x{height} = {height * width} pixels exceeds the limit of {max_pixels} pixels; "
            "lower the camera resolution or raise the limit (node parameter max_image_pixels)"
        )


def layout_of(encoding: str) -> PixelLayout:
    layout = ENCODINGS.get(encoding)
    if layout is None:
        raise ImageConversionError(
            f"image encoding '{encoding}' is not supported; supported: {', '.join(ENCODINGS)} "
            "(configure the camera driver for one of these, or subscribe to a compressed topic)"
        )
    return layout


def image_to_array(image, max_pixels: int = DEFAULT_MAX_PIXELS, layout: PixelLayout | None = None) -> np.ndarray:
    """sensor_msgs/Image -> (H, W, C) array in the message's own channel order and dtype.

    A zero-copy view of `image.data`; multi-byte data is read with the message's byte order.
    `layout` defaults to the colour encoding's (ENCODINGS).
    """
    height, width, step = int(image.height), int(image.width), int(image.step)
    layout = layout or layout_of(image.encoding)
    check_image_size(height, width, max_pixels)
    row_bytes = width * layout.bytes_per_pixel
    if step < row_bytes:
        raise ImageConversionError(
            f"step {step} is smaller than one row of {width} {image.encoding} pixels ({row_bytes} bytes); "
            "the publisher filled step wrongly"
        )
    buffer = np.frombuffer(image.data, dtype=np.uint8)  # zero-copy over bytes / array.array
    expected = step * height
    if buffer.size < expected:
        raise ImageConversionError(
            f"image data is truncated: {buffer.size} bytes for {height} rows of step {step} "
            f"(expected {expected}); the message was cut or step/height are wrong"
        )
    if buffer.size > expected:
        raise ImageConversionError(
            f"image data has {buffer.size} bytes but step*height = {step}*{height} = {expected}; "
            "step or height do not match the data"
        )
    rows = buffer.reshape(height, step)[:, :row_bytes]  # (H, row_bytes), padding sliced off
    if np.dtype(layout.dtype).itemsize > 1:
        order = ">" if image.is_bigendian else "<"  # the sender's byte order
        rows = rows.view(np.dtype(layout.dtype).newbyteorder(order))  # (H, W * C)
    return rows.reshape(height, width, layout.channels)  # (H, W, C)


def depth_image_array(image, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/Image with depth (16UC1 or 32FC1) -> (H, W) uint16 or float32 in native byte order."""
    layout = DEPTH_ENCODINGS.get(image.encoding)
    if layout is None:
        raise ImageConversionError(
            f"depth encoding '{image.encoding}' is not supported: publish aligned depth as 16UC1 (millimetres) "
            "or 32FC1 (metres)"
        )
    pixels = image_to_array(image, max_pixels, layout)[:, :, 0]  # (H, W)
    return pixels.astype(layout.dtype, copy=False)  # a copy only for a byte order other than ours


def image_to_rgb(image, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/Image -> (H, W, 3) uint8 RGB, a view of the message buffer where possible.

    rgb8/bgr8/rgba8/bgra8 become views (channel reorder and alpha drop by striding); mono8 is
    broadcast to three channels (also a view); mono16 is scaled to 8 bits (value >> 8), a copy.
    """
    layout = layout_of(image.encoding)
    pixels = image_to_array(image, max_pixels)  # (H, W, C)
    if layout.dtype is np.uint16:
        pixels = (pixels >> 8).astype(np.uint8)
    if layout.channels == 1:
        return np.broadcast_to(pixels, (*pixels.shape[:2], 3))
    if layout.is_bgr:
        return pixels[:, :, 2::-1]  # B,G,R(,A) -> R,G,B by a negative stride
    return pixels[:, :, :3]


def fill_image(image, pixels: np.ndarray, encoding: str) -> None:
    """Write an array into a sensor_msgs/Image's fields (little-endian, no row padding).

    `pixels` is (H, W, C) or (H, W) for mono and depth, in `encoding`'s channel order and dtype.
    """
    layout = DEPTH_ENCODINGS[encoding] if encoding in DEPTH_ENCODINGS else layout_of(encoding)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] != layout.channels or pixels.dtype != layout.dtype:
        raise ImageConversionError(
            f"array of shape {pixels.shape} and dtype {pixels.dtype} does not fit encoding '{encoding}' "
            f"(needs (H, W, {layout.channels}) {np.dtype(layout.dtype).name})"
        )
    height, width = pixels.shape[:2]
    image.height, image.width = height, width
    image.encoding = encoding
    image.is_bigendian = 0
    image.step = width * layout.bytes_per_pixel
    image.data = pixels.astype(np.dtype(layout.dtype).newbyteorder("<"), copy=False).tobytes()


def compressed_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header, or None if neither is recognised."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if data[:2] == b"\xff\xd8":
        position = 2
        while position + 4 <= len(data):
            if data[position] != 0xFF:
                return None
            marker = data[position + 1]
            if marker == 0xFF:  # fill byte before a marker
                position += 1
                continue
            segment_length = struct.unpack(">H", data[position + 2 : position + 4])[0]
            # SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                if position + 9 > len(data):
                    return None
                height, width = struct.unpack(">HH", data[position + 5 : position + 9])
                return width, height
            position += 2 + segment_length
    return None


def has_end_marker(data: bytes) -> bool:
    """Whether PNG/JPEG data ends complete (decoders fill a cut JPEG with grey silently)."""
    if data[:2] == b"\xff\xd8":
        return data.rstrip(b"\x00")[-2:] == b"\xff\xd9"  # EOI; some encoders pad with zeros
    return data[-8:] == b"IEND\xaeB`\x82"  # IEND chunk type + its fixed CRC


def compressed_image_to_rgb(image, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/CompressedImage (JPEG or PNG) -> (H, W, 3) uint8 RGB.

    The size in the file header is checked against max_pixels before anything is decoded.
    """
    image_format = image.format.lower()
    if "jpeg" not in image_format and "jpg" not in image_format and "png" not in image_format:
        raise ImageConversionError(
            f"compressed image format '{image.format}' is not supported; only jpeg and png "
            "(image_transport's 'compressed' plugin)"
        )
    data = bytes(image.data)
    size = compressed_size(data)
    if size is None:
        raise ImageConversionError(
            f"compressed image ({len(data)} bytes, format '{image.format}') has no readable PNG/JPEG header; "
            "the data is truncated or not an image"
        )
    width, height = size
    check_image_size(height, width, max_pixels)
    if not has_end_marker(data):
        raise ImageConversionError(
            f"compressed {width}x{height} image ({len(data)} bytes, format '{image.format}') is truncated: "
            "its end marker is missing"
        )
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)  # (H, W, 3) BGR
    if bgr is None:
        raise ImageConversionError(
            f"could not decode the {width}x{height} compressed image ({len(data)} bytes, format '{image.format}'); "
            "the data is probably truncated"
        )
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def mask_to_mono8(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """A target mask (h, w) bool (`GroundingResult.mask`: the letterbox already undone, at the
    resolution of the image that was grounded) -> (height, width) uint8, 255 on the target and 0
    elsewhere, at the camera's resolution: what a mono8 sensor_msgs/Image of the mask carries
    (`fill_image(msg, mask_to_mono8(...), "mono8")`). A mask of another size (the frame was scaled
    before grounding) is resized with nearest neighbours, so it stays binary."""
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"a target mask must be a non-empty (H, W) array, got shape {mask.shape}")
    check_image_size(height, width)
    pixels = np.where(mask.astype(bool), np.uint8(255), np.uint8(0))  # (h, w)
    if pixels.shape != (height, width):
        pixels = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_NEAREST)
    return pixels
