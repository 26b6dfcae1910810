"""The demo: speak a command to the grounding node about a camera scene and show the box it publishes.

    make demo                                      # a fresh Spoken Shapes scene, a held-out voice
    make demo TEXT="the red circle" VOICE=en-gb+f3 SEED=7
    make demo IMAGE=photo.jpg AUDIO=command.wav    # your own picture and recording
    make demo IMAGE=photo.jpg TEXT="the red cup"   # your own picture, the command said by espeak-ng

(`make demo ...` runs `.venv/bin/python scripts/demo.py --text ... --voice ... --seed ...`.)

What happens, with every ROS process on loopback (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, a
ROS_DOMAIN_ID of its own, config/fastdds_loopback.xml):
1. A Spoken Shapes scene and command the model never trained on: the generator's layout and
   drawing (csref_training.synth) with the demo's own seed stream, spoken by espeak-ng in a
   held-out voice (HELDOUT_VOICES). With TEXT, the scene is built around TEXT: a target with the
   named attributes and distractors related to it, redrawn until the generator's own semantics
   say that TEXT picks out exactly that object (`referents`) and that no shorter expression
   would (`describe`), i.e. TEXT is what the generator itself would have said.
2. The grounding node starts as a subprocess with the model (`-p model_checkpoint:=...
   -p audio_source:=file -p audio_file:=<wav>`); this process publishes the scene as a 10 Hz
   camera stream, the node plays the WAV in real time once frames arrive, hears the command
   (VAD), and publishes a vision_msgs/Detection2D on /csref/target_box.
3. The box, its score, the match with the generator's target box (IoU > 0.5), the latency
   from the end of speech (the node's own measurement, from /diagnostics) and an annotated PNG.

Exit status: 0 when a box arrived, 1 when none came within --timeout (or the node failed),
2 for bad arguments or a missing model.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import soundfile as sf
from PIL import Image as PILImage, ImageDraw, ImageFont

from csref_training.synth import (
    BACKGROUNDS,
    CARRIER_PHRASES,
    COLOURS,
    HELDOUT_VOICES,
    HORIZONTAL_PLACES,
    SAMPLE_RATE,
    SHAPES,
    SIZES,
    VERTICAL_PLACES,
    Expression,
    SceneObject,
    SynthConfig,
    check_voices,
    describe,
    distractor_attrs,
    make_background,
    place_objects,
    referents,
    render_scene,
    render_speech,
    sample_layout,
    size_classes_separated,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = REPO_ROOT / "models" / "spoken_shapes_tiny"
FASTDDS_PROFILE = REPO_ROOT / "config" / "fastdds_loopback.xml"
# First word of the demo's seed stream; the training and evaluation data use seeds 0 and 1 as
# first word ([seed, split, index]), so no demo scene or utterance is one the model has seen.
DEMO_SEED_STREAM = 20261122
# Domain ids 90..101 are the scripts' (tests use 1..89); a lock file per id, shared with the
# tests' locks, keeps two demos apart.
DOMAIN_IDS = range(90, 102)
DOMAIN_LOCK_DIR = Path(tempfile.gettempdir()) / "csref_ros_test_domains"
# The scene `make demo` shows without SEED; tests/test_demo.py requires the demo model to get it right.
DEFAULT_SEED = 0
IMAGE_TOPIC = "/csref_demo/camera/image_raw"
CAMERA_RATE_HZ = 10.0
# Larger user pictures are scaled down before publishing (a 1080p frame, 6 MB, fits the
# shared-memory transport of the Fast DDS profile); the box is mapped back to the original.
MAX_PUBLISHED_PIXELS = 1920 * 1080
# A TEXT scene is redrawn at most this many times before giving up.
MAX_SCENE_ATTEMPTS = 5000
MATCH_IOU = 0.5

ANNOTATED_MIN_WIDTH = 720  # px; smaller scenes are enlarged in the annotated PNG
BOX_COLOUR = (255, 40, 200)
TARGET_COLOUR = (40, 220, 70)
OUTLINE_COLOUR = (20, 20, 20)


@dataclass
class DemoScene:
    image: np.ndarray  # (H, W, 3) uint8 RGB, as published
    wav_path: Path
    said: str  # the command's text, or a description of the user's recording
    voice: str | None
    speech_s: float
    target_box: tuple[float, float, float, float] | None  # x1, y1, x2, y2; None for the user's image
    scale: float = 1.0  # published pixels per original pixel (user's image only)
    original: np.ndarray | None = None  # the user's image before scaling


# --------------------------------------------------------------------------------------
# The scene and the command
# --------------------------------------------------------------------------------------
EXPRESSION_PATTERN = re.compile(
    r"the"
    rf"(?: (?P<size>{'|'.join(SIZES)}))?"
    rf"(?: (?P<colour>{'|'.join(COLOURS)}))?"
    rf" (?P<shape>{'|'.join(SHAPES)})"
    rf"(?: (?P<horizontal>{'|'.join(HORIZONTAL_PLACES.values())}))?"
    rf"(?: (?P<vertical>{'|'.join(VERTICAL_PLACES.values())}))?"
)


def parse_expression(text: str) -> Expression:
    """The Spoken Shapes expression in `text` (after an optional carrier phrase such as "pick up")."""
    words = " ".join(text.lower().replace(",", " ").split())
    for carrier in CARRIER_PHRASES:
        if words.startswith(carrier + " "):
            words = words[len(carrier) + 1:]
            break
    match = EXPRESSION_PATTERN.fullmatch(words)
    if match is None:
        raise ValueError(
            f"TEXT {text!r} is not a Spoken Shapes command. Say: [{' | '.join(CARRIER_PHRASES)}] the "
            f"[{' | '.join(SIZES)}] [{' | '.join(COLOURS)}] <{' | '.join(SHAPES)}> "
            f"[{' | '.join(HORIZONTAL_PLACES.values())}] [{' | '.join(VERTICAL_PLACES.values())}], "
            f'e.g. "pick up the small blue square on the left". For any other sentence, bring your own '
            f"picture: IMAGE=photo.jpg TEXT=...")
    places = {v: k for k, v in {**HORIZONTAL_PLACES, **VERTICAL_PLACES}.items()}
    return Expression(
        shape=match["shape"],
        colour=match["colour"],
        size=match["size"],
        horizontal=places.get(match["horizontal"]),
        vertical=places.get(match["vertical"]),
    )


def layout_for_expression(
    expression: Expression, rng: np.random.Generator, background: np.ndarray
) -> tuple[list[SceneObject], int]:
    """(objects, target index) of a scene in which `expression` is what the generator would say
    of the target: it picks out exactly the target, and no expression with fewer attributes (or
    as many but fewer place words) does.

    Besides distractors drawn as the generator draws them, each attribute the expression names
    gets a foil that only that attribute tells apart from the target (another colour, the other
    size, an identical twin per place word), so that long expressions are needed often enough.
    """
    height, width = background.shape[:2]
    for _ in range(MAX_SCENE_ATTEMPTS):
        shape = expression.shape
        colour = expression.colour or str(rng.choice(list(COLOURS)))
        size = expression.size or str(rng.choice(SIZES))
        foils = [(shape, colour, size)] * expression.num_place
        if expression.colour:
            foils.append((shape, str(rng.choice([c for c in COLOURS if c != colour])), size))
        if expression.size:
            foils.append((shape, colour, "big" if size == "small" else "small"))
        extra = max(0, int(rng.integers(2, 6)) - len(foils))
        wanted = [(shape, colour, size), *foils, *(distractor_attrs(rng, shape, colour, size) for _ in range(extra))]
        placed = place_objects(rng, background, wanted)
        if len(placed) < len(wanted):
            continue
        objects = [placed[i] for i in range(len(wanted))]
        if not size_classes_separated(objects):
            continue
        if referents(expression, objects, width, height) != [0]:
            continue
        shortest = describe(0, objects, width, height, rng)
        if (shortest.num_optional, shortest.num_place) != (expression.num_optional, expression.num_place):
            continue
        order = rng.permutation(len(objects))  # the target's index carries no information
        return [objects[i] for i in order], int(np.flatnonzero(order == 0)[0])
    raise ValueError(
        f'could not draw a scene in which "{expression.text}" is the shortest description of one object '
        f"in {MAX_SCENE_ATTEMPTS} tries on a {width}x{height} canvas; try another SEED or a shorter TEXT")


def generated_scene(seed: int, text: str | None, voice: str | None, out_dir: Path) -> DemoScene:
    """A Spoken Shapes scene (PNG and WAV written to out_dir) from the demo's own seed stream."""
    rng = np.random.default_rng([DEMO_SEED_STREAM, seed])
    defaults = SynthConfig(out=out_dir)
    width, height = (int(rng.integers(defaults.image_size_range[0], defaults.image_size_range[1] + 1)) for _ in range(2))
    background = make_background(rng, width, height, BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
    if text is None:
        objects, target, expression = sample_layout(rng, background)
        text = expression.text
        if rng.random() < defaults.carrier_prob:
            text = f"{CARRIER_PHRASES[rng.integers(len(CARRIER_PHRASES))]} {text}"
    else:
        objects, target = layout_for_expression(parse_expression(text), rng, background)
    image = render_scene(rng, background, objects)

    voice = voice or HELDOUT_VOICES[rng.integers(len(HELDOUT_VOICES))]
    check_voices([voice])
    rate = int(rng.integers(defaults.rate_range[0], defaults.rate_range[1] + 1))
    pitch = int(rng.integers(defaults.pitch_range[0], defaults.pitch_range[1] + 1))
    wave = render_speech(rng, text, voice, rate, pitch, snr_db=None)
    wav_path = out_dir / "command.wav"
    sf.write(wav_path, wave, SAMPLE_RATE, subtype="PCM_16")
    cv2.imwrite(str(out_dir / "scene.png"), image[:, :, ::-1])
    return DemoScene(image, wav_path, text, voice, speech_duration_s(wave), objects[target].box)


def speech_duration_s(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Seconds from the first to the last sample above 1% of the peak."""
    loud = np.flatnonzero(np.abs(wave) > 0.01 * max(float(np.abs(wave).max()), 1e-9))
    return float(loud[-1] - loud[0]) / sample_rate if len(loud) else 0.0


def user_scene(image_path: Path, audio_path: Path | None, text: str | None, voice: str | None, out_dir: Path) -> DemoScene:
    """The user's picture with their recording, or with `text` said by espeak-ng."""
    original_bgr = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
    if original_bgr is None:
        raise ValueError(f"IMAGE {image_path}: cannot read it as a picture (is it a JPEG/PNG file?)")
    original = cv2.cvtColor(original_bgr, cv2.COLOR_BGR2RGB)
    height, width = original.shape[:2]
    scale = min(1.0, float(np.sqrt(MAX_PUBLISHED_PIXELS / (height * width))))
    image = original if scale == 1.0 else cv2.resize(
        original, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    if audio_path is not None:
        try:
            wave, sample_rate = sf.read(audio_path, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as error:
            raise ValueError(f"AUDIO {audio_path}: cannot read it as a WAV/FLAC file ({error})") from error
        speech_s = speech_duration_s(wave.mean(axis=1), sample_rate)
        return DemoScene(image, audio_path.resolve(), f"your recording {audio_path}", None, speech_s, None, scale, original)
    voice = voice or "en-us"
    check_voices([voice])
    rng = np.random.default_rng([DEMO_SEED_STREAM, 0])
    wave = render_speech(rng, text, voice, rate=160, pitch=50, snr_db=None)
    wav_path = out_dir / "command.wav"
    sf.write(wav_path, wave, SAMPLE_RATE, subtype="PCM_16")
    return DemoScene(image, wav_path, text, voice, speech_duration_s(wave), None, scale, original)


# --------------------------------------------------------------------------------------
# ROS: the node as a subprocess, the camera and the listener in this process
# --------------------------------------------------------------------------------------
def lock_domain_id() -> tuple[int, object]:
    """A ROS domain id no other demo, benchmark or test run holds, and its lock (keep it open)."""
    DOMAIN_LOCK_DIR.mkdir(exist_ok=True)
    for domain_id in DOMAIN_IDS:
        lock_file = open(DOMAIN_LOCK_DIR / f"{domain_id}.lock", "w")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            continue
        return domain_id, lock_file
    raise RuntimeError(f"all ROS domain ids {DOMAIN_IDS.start}..{DOMAIN_IDS.stop - 1} are in use (locks in {DOMAIN_LOCK_DIR})")


def ros_environment(domain_id: int, out_dir: Path) -> dict[str, str]:
    return dict(
        os.environ,
        ROS_DOMAIN_ID=str(domain_id),
        ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
        RMW_IMPLEMENTATION="rmw_fastrtps_cpp",
        FASTDDS_DEFAULT_PROFILES_FILE=str(FASTDDS_PROFILE),
        ROS_LOG_DIR=str(out_dir / "ros_log"),
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )


def start_node(checkpoint: Path, wav_path: Path, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "csref_ros.grounding_node", "--ros-args",
        "-p", f"model_checkpoint:={checkpoint}",
        "-p", "audio_source:=file",
        "-p", f"audio_file:={wav_path}",
        "-p", f"image_topic:={IMAGE_TOPIC}",
        "-p", "diagnostics_period_s:=0.25",
    ]
    with open(log_path, "w") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)


def stop_process(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Terminate (SIGTERM: rclpy shuts down cleanly), kill if it is still there after grace_s."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class Outcome:
    box: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2 in published pixels
    score: float | None = None
    latency_ms: str | None = None
    node_error: str | None = None  # why the node could not load the model (its /diagnostics)
    node_exit: int | None = None  # the node's exit status if it ended before the box came


def ground_over_ros(scene: DemoScene, node: subprocess.Popen, timeout_s: float) -> Outcome:
    """Publish the scene until the node's Detection2D (and its latency in /diagnostics) arrives."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rclpy.signals import SignalHandlerOptions
    from sensor_msgs.msg import Image
    from vision_msgs.msg import Detection2D

    from csref_ros.image_conversion import fill_image

    outcome = Outcome()
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)  # Ctrl-C stays a KeyboardInterrupt here
    ros_node = rclpy.create_node("csref_demo")
    try:
        # The node's image subscription is best effort (sensor data), like a camera driver's.
        camera = ros_node.create_publisher(Image, IMAGE_TOPIC, QoSProfile(depth=5, reliability=ReliabilityPolicy.BEST_EFFORT))
        frame = Image()
        fill_image(frame, np.ascontiguousarray(scene.image), "rgb8")
        frame.header.frame_id = "demo_camera"

        def publish_frame() -> None:
            frame.header.stamp = ros_node.get_clock().now().to_msg()
            camera.publish(frame)

        def on_detection(msg: Detection2D) -> None:
            if outcome.box is None:
                cx, cy = msg.bbox.center.position.x, msg.bbox.center.position.y
                w, h = msg.bbox.size_x, msg.bbox.size_y
                outcome.box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
                outcome.score = msg.results[0].hypothesis.score if msg.results else float("nan")

        def on_diagnostics(msg: DiagnosticArray) -> None:
            for status in msg.status:
                values = {kv.key: kv.value for kv in status.values}
                if "speech grounding" not in status.name:
                    continue
                if values.get("state") == "unconfigured" and level_of(status.level) == level_of(DiagnosticStatus.ERROR):
                    outcome.node_error = status.message
                if outcome.box is not None and int(values.get("detections", 0)) >= 1:
                    outcome.latency_ms = values.get("latency_end_of_speech_to_publish_p50_ms")

        ros_node.create_timer(1.0 / CAMERA_RATE_HZ, publish_frame)
        ros_node.create_subscription(Detection2D, "/csref/target_box", on_detection, 10)
        ros_node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)

        deadline = time.monotonic() + timeout_s
        latency_deadline = None
        while time.monotonic() < deadline and outcome.node_error is None and node.poll() is None:
            rclpy.spin_once(ros_node, timeout_sec=0.05)
            if outcome.box is not None:
                latency_deadline = latency_deadline or time.monotonic() + 2.0  # the next diagnostics
                if outcome.latency_ms is not None or time.monotonic() > latency_deadline:
                    break
    finally:
        ros_node.destroy_node()
        rclpy.try_shutdown()
    outcome.node_exit = node.poll()
    return outcome


def level_of(level: bytes | int) -> int:
    """A DiagnosticStatus level (a one-byte `bytes` in rclpy) as an int."""
    return int.from_bytes(level, "little") if isinstance(level, bytes) else int(level)


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------
def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two x1, y1, x2, y2 boxes."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def dashed_rectangle(draw: ImageDraw.ImageDraw, box: tuple[float, ...], colour: tuple[int, int, int], width: int, dash: int) -> None:
    """Dashes of `colour` with dark gaps, visible on any background."""
    x1, y1, x2, y2 = box
    draw.rectangle(box, outline=OUTLINE_COLOUR, width=width)
    for (ax, ay), (bx, by) in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
        length = max(abs(bx - ax), abs(by - ay), 1e-6)
        for start in np.arange(0.0, length, 2 * dash):
            t0, t1 = start / length, min(start + dash, length) / length
            draw.line([(ax + (bx - ax) * t0, ay + (by - ay) * t0), (ax + (bx - ax) * t1, ay + (by - ay) * t1)], fill=colour, width=width)


def overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_tag(
    draw: ImageDraw.ImageDraw, text: str, box: tuple[float, ...], colour: tuple[int, int, int],
    font: ImageFont.FreeTypeFont, image_size: tuple[int, int], avoid: list[tuple[float, ...]],
) -> tuple[float, float, float, float]:
    """A filled tag with `text` at a box's top-left corner: above the box, else below it, else
    just inside it; the first spot inside the image that covers none of `avoid`. Returns it."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, (bottom - top) // 5)
    tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
    x = min(max(0.0, box[0]), image_size[0] - tag_w)
    spots = [(x, box[1] - tag_h), (x, box[3]), (x, box[1])]
    inside = [(sx, sy) for sx, sy in spots if 0 <= sy and sy + tag_h <= image_size[1]] or [(x, 0.0)]
    free = [(sx, sy) for sx, sy in inside if not any(overlaps((sx, sy, sx + tag_w, sy + tag_h), a) for a in avoid)]
    sx, sy = (free or inside)[0]
    draw.rectangle([sx, sy, sx + tag_w, sy + tag_h], fill=colour)
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    draw.text((sx + pad - left, sy + pad - top), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)
    return sx, sy, sx + tag_w, sy + tag_h


def fitting_font(draw: ImageDraw.ImageDraw, lines: list[str], size: int, max_width: float) -> ImageFont.FreeTypeFont:
    """The bundled font at `size`, smaller if a line would not fit into max_width."""
    while True:
        font = ImageFont.load_default(size=size)
        if size <= 8 or max(draw.textlength(line, font=font) for line in lines) <= max_width:
            return font
        size -= 1


def annotate(scene: DemoScene, outcome: Outcome, match_iou: float | None, path: Path) -> None:
    """The picture with the published box (solid magenta, tagged with the command and score),
    the generator's target box (dashed green) and a caption; written as PNG. Small scenes are
    enlarged so that the text stays legible."""
    base = scene.original if scene.original is not None else scene.image
    zoom = max(1.0, ANNOTATED_MIN_WIDTH / base.shape[1])
    picture = PILImage.fromarray(base)
    if zoom > 1.0:
        picture = picture.resize((round(base.shape[1] * zoom), round(base.shape[0] * zoom)), PILImage.LANCZOS)
    width, height = picture.size
    unit = width / ANNOTATED_MIN_WIDTH  # line widths and text grow with the picture

    said = f"said: {scene.said}" if scene.voice is None else f'said: "{scene.said}"  (voice {scene.voice}, {scene.speech_s:.1f} s)'
    result = "no box arrived" if outcome.box is None else f"box score {outcome.score:.2f}"
    if match_iou is not None:
        result += f"   IoU with the target {match_iou:.2f}: {'MATCH' if match_iou > MATCH_IOU else 'MISS'}"
    caption = [said, result]
    if outcome.latency_ms:
        caption.append(f"{outcome.latency_ms} ms from the end of speech to the box")
    line_h = round(24 * unit)
    canvas = PILImage.new("RGB", (width, height + line_h * len(caption) + round(12 * unit)), (30, 30, 30))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=round(17 * unit))
    tags: list[tuple[float, ...]] = []
    if outcome.box is not None:
        box = tuple(v / scene.scale * zoom for v in outcome.box)
        line_width = max(3, round(3 * unit))
        draw.rectangle((box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1), outline=OUTLINE_COLOUR, width=line_width + 2)
        draw.rectangle(box, outline=BOX_COLOUR, width=line_width)
    if scene.target_box is not None:
        target = tuple(v * zoom for v in scene.target_box)
        dashed_rectangle(draw, target, TARGET_COLOUR, width=max(2, round(3 * unit)), dash=round(10 * unit))
    if outcome.box is not None:
        command = scene.said if scene.voice is not None else "your command"
        tags.append(place_tag(draw, f'"{command}"  {outcome.score:.2f}', box, BOX_COLOUR, font, (width, height), tags))
    if scene.target_box is not None:
        place_tag(draw, "target", target, TARGET_COLOUR, font, (width, height), tags)
    caption_font = fitting_font(draw, caption, round(16 * unit), width - 16 * unit)
    for i, line in enumerate(caption):
        draw.text((round(8 * unit), height + round(8 * unit) + i * line_h), line, fill=(235, 235, 235), font=caption_font)
    canvas.save(path)


def box_text(box: tuple[float, ...]) -> str:
    x1, y1, x2, y2 = box
    return f"x1={x1:.0f} y1={y1:.0f} x2={x2:.0f} y2={y2:.0f} (centre {(x1 + x2) / 2:.0f},{(y1 + y2) / 2:.0f}, size {x2 - x1:.0f}x{y2 - y1:.0f})"


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/demo.py",
        description="Say a command to the csref_ros grounding node about a camera scene; print and draw its box.",
    )
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                        help=f"model: our checkpoint directory or an official CSRef .pth (default {DEFAULT_CHECKPOINT.relative_to(REPO_ROOT)})")
    parser.add_argument("--text", help='the command, e.g. "pick up the red circle" (default: the generator chooses)')
    parser.add_argument("--voice", help="espeak-ng voice, e.g. en-gb+f3 (default: a held-out voice)")
    parser.add_argument("--seed", type=int, help=f"scene seed (default {DEFAULT_SEED})")
    parser.add_argument("--image", type=Path, help="your own picture (JPEG/PNG) instead of a generated scene")
    parser.add_argument("--audio", type=Path, help="your own recording (WAV/FLAC) of the command, with --image")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "demo", help="where the PNGs, WAV and logs go")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the box after the node starts")
    args = parser.parse_args(argv)
    if args.audio is not None and args.image is None:
        parser.error("AUDIO (--audio) goes with IMAGE (--image): a recording about your own picture")
    if args.image is not None:
        if (args.audio is None) == (args.text is None):
            parser.error("with IMAGE (--image) give either AUDIO=your.wav (--audio) or TEXT=... (--text), not both")
        if args.seed is not None:
            parser.error("SEED (--seed) chooses a generated scene; it does not apply to IMAGE")
        for path in (args.image, args.audio):
            if path is not None and not path.is_file():
                parser.error(f"{path}: no such file")
    return args


def check_checkpoint(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be used, or None."""
    if checkpoint.is_file():
        return None
    if (checkpoint / "model.safetensors").is_file() and (checkpoint / "config.yaml").is_file():
        return None
    return (
        f"no model at {checkpoint} (expected model.safetensors + config.yaml, or an official CSRef .pth).\n"
        f"The demo model is models/spoken_shapes_tiny in the repository (restore it with git checkout). "
        f"To train one yourself, run scripts/train_spoken_shapes.sh (about 4.5 hours on a 2-core CPU) and "
        f"pass CHECKPOINT=runs/srec_spoken_shapes/best (--checkpoint); any other model works the same way."
    )


def report(scene: DemoScene, outcome: Outcome, out_dir: Path, node_log: Path, timeout_s: float) -> int:
    """Print the outcome, write annotated.png and result.json; the exit status."""
    match_iou = None
    if outcome.box is not None and scene.target_box is not None:
        match_iou = iou(outcome.box, scene.target_box)
    annotated = out_dir / "annotated.png"
    annotate(scene, outcome, match_iou, annotated)
    box = None if outcome.box is None else tuple(v / scene.scale for v in outcome.box)
    result = {
        "said": scene.said,
        "voice": scene.voice,
        "box_xyxy": box,
        "score": outcome.score,
        "target_xyxy": scene.target_box,
        "iou": match_iou,
        "match": None if match_iou is None else match_iou > MATCH_IOU,
        "latency_end_of_speech_ms": outcome.latency_ms,
        "annotated_png": str(annotated),
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))

    if box is None:
        if outcome.node_error:
            reason = f"the node could not start: {outcome.node_error}"
        elif outcome.node_exit is not None:
            reason = f"the node exited with status {outcome.node_exit}"
        else:
            reason = f"no box on /csref/target_box within {timeout_s:.0f} s"
        print(f"error: {reason}; the node's log ({node_log}) ends with:", file=sys.stderr)
        print("\n".join(node_log.read_text(errors="replace").splitlines()[-15:]), file=sys.stderr)
        return 1
    print(f"box      {box_text(box)}  score {outcome.score:.2f}")
    if match_iou is not None:
        print(f"target   {box_text(scene.target_box)}  IoU {match_iou:.2f}: {'MATCH' if match_iou > MATCH_IOU else 'MISS'}")
    latency = f"{outcome.latency_ms} ms" if outcome.latency_ms else "not reported"
    print(f"latency  {latency} from the end of speech to the box (the node's /diagnostics)")
    print(f"picture  {annotated}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checkpoint = args.checkpoint.resolve()
    problem = check_checkpoint(checkpoint)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    sys.stdout.reconfigure(line_buffering=True)  # progress shows at once in make and CI logs
    # SIGTERM (e.g. from a CI runner) unwinds like Ctrl-C, so the node is always stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    start = time.monotonic()
    out_dir = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    try:
        if args.image is not None:
            scene = user_scene(args.image, args.audio, args.text, args.voice, out_dir)
        else:
            seed = DEFAULT_SEED if args.seed is None else args.seed
            scene = generated_scene(seed, args.text, args.voice, out_dir)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    height, width = scene.image.shape[:2]
    if args.image is None:
        print(f"scene    {out_dir / 'scene.png'} ({width}x{height}, seed {seed}, never seen in training)")
    else:
        print(f"scene    {args.image} (published at {width}x{height})")
    speech = f"{scene.speech_s:.1f} s of speech"
    if scene.voice is None:
        print(f"said     {scene.said} ({speech})")
    else:
        print(f'said     "{scene.said}" (voice {scene.voice}, {speech})')

    domain_id, domain_lock = lock_domain_id()
    env = ros_environment(domain_id, out_dir)
    os.environ.update(env)  # this process's own ROS participant, before rclpy starts
    node_log = out_dir / "node.log"
    print(f"node     model {checkpoint}, ROS domain {domain_id} on loopback, log {node_log}")
    node = start_node(checkpoint, scene.wav_path, env, node_log)
    try:
        outcome = ground_over_ros(scene, node, args.timeout)
        status = report(scene, outcome, out_dir, node_log, args.timeout)
        print(f"took     {time.monotonic() - start:.1f} s")
        return status
    finally:
        stop_process(node)
        domain_lock.close()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: the node has been stopped on the way out
        sys.exit(130)
