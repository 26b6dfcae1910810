"""The demo: speak a command to the grounding node about a camera scene and show the box it publishes.

    make demo                                      # a fresh Spoken Shapes scene, a held-out voice
    make demo TEXT="the red circle" VOICE=en-gb+f3 SEED=7
    make demo IMAGE=photo.jpg AUDIO=command.wav    # your own picture and recording
    make demo IMAGE=photo.jpg TEXT="the red cup"   # your own picture, the command said by espeak-ng

(`make demo ...` runs `.venv/bin/python scripts/demo.py --text ... --voice ... --seed ...`.)

What happens, with every ROS process on loopback (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, a
ROS_DOMAIN_ID of its own, config/fastdds_loopback.xml):
1. A Spoken Shapes scene and command the model never trained on: the generator's layout and
   drawing (csref_training.spoken_shapes) with the demo's own seed stream, spoken by espeak-ng
   in a held-out voice (HELDOUT_VOICES). With TEXT, the grammar parses TEXT back into the
   attributes it names (`parse_expression`) and the scene is built around them
   (`layout_for_expression`): TEXT is what the generator itself would have said of the target.
2. The grounding node starts as a subprocess with the model (`-p model_checkpoint:=...
   -p audio_source:=file -p audio_file:=<wav>`); this process publishes the scene as a 10 Hz
   camera stream, the node plays the WAV in real time once frames arrive, hears the command
   (VAD), and publishes a vision_msgs/Detection2D on /csref/target_box.
3. The box, its score, the match with the generator's target box (IoU > 0.5), the latency
   from the end of speech (the node's own measurement, from /diagnostics) and an annotated PNG.
   With a model that has a mask head, the node is asked for its mask (`publish_mask:=true`) and
   the mono8 image it publishes on /csref/target_mask is drawn in the picture too.

Exit status: 0 when a box arrived, 1 when none came within --timeout (or the node failed),
2 for bad arguments or a missing model.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import soundfile as sf

from csref_model.audio import SAMPLE_RATE, load_audio
from csref_model.boxes import box_iou
from csref_model.checkpoint import read_config
from csref_model.im2sp import ANSWER_LEXICON, Answerer
from csref_model.visualize import TARGET_COLOUR, DrawnBox, draw_boxes, save_picture
from csref_training.spoken_shapes.generate import SynthConfig
from csref_training.spoken_shapes.grammar import CARRIER_PHRASES, parse_expression
from csref_training.spoken_shapes.render import BACKGROUNDS, make_background, render_scene
from csref_training.spoken_shapes.scene import layout_for_expression, sample_layout
from csref_ros.loopback import lock_domain_id, loopback_environment
from csref_training.spoken_shapes.speech import HELDOUT_VOICES, check_voices, render_speech

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = REPO_ROOT / "models" / "spoken_shapes_tiny"
FASTDDS_PROFILE = REPO_ROOT / "config" / "fastdds_loopback.xml"
# First word of the demo's seed stream; the training and evaluation data use seeds 0 and 1 as
# first word ([seed, split, index]), so no demo scene or utterance is one the model has seen.
DEMO_SEED_STREAM = 20261122
# Domain ids 90..101 are the scripts' (tests use 1..89); a lock file per id, shared with the
# tests' locks, keeps two demos apart.
DOMAIN_IDS = range(90, 102)
# The scene `make demo` shows without SEED; tests/test_demo.py requires the demo model to get it right.
DEFAULT_SEED = 0
IMAGE_TOPIC = "/csref_demo/camera/image_raw"
CAMERA_RATE_HZ = 10.0
# Larger user pictures are scaled down before publishing (a 1080p frame, 6 MB, fits the
# shared-memory transport of the Fast DDS profile); the box is mapped back to the original.
MAX_PUBLISHED_PIXELS = 1920 * 1080
MATCH_IOU = 0.5
ANNOTATED_MIN_WIDTH = 720  # px; smaller scenes are enlarged in the annotated PNG


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
        try:
            expression = parse_expression(text)
        except ValueError as error:
            raise ValueError(f"TEXT {error}. For any other sentence, bring your own picture: IMAGE=photo.jpg TEXT=...") from error
        try:
            objects, target = layout_for_expression(expression, rng, background)
        except ValueError as error:
            raise ValueError(f"{error}; try another SEED or a shorter TEXT") from error
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
            wave, sample_rate = load_audio(audio_path)
        except ValueError as error:
            raise ValueError(f"AUDIO (--audio): {error}") from error
        speech_s = speech_duration_s(wave, sample_rate)
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
def has_mask_head(checkpoint: Path) -> bool:
    """Whether the model gives masks: our directories say so in config.yaml; official .pth files are box-only."""
    return checkpoint.is_dir() and read_config(checkpoint).mask_head.enabled


def start_node(checkpoint: Path, wav_path: Path, env: dict[str, str], log_path: Path,
               publish_mask: bool) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "csref_ros.grounding_node", "--ros-args",
        "-p", f"model_checkpoint:={checkpoint}",
        "-p", "audio_source:=file",
        "-p", f"audio_file:={wav_path}",
        "-p", f"image_topic:={IMAGE_TOPIC}",
        "-p", "diagnostics_period_s:=0.25",
        *(("-p", "publish_mask:=true") if publish_mask else ()),
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
    mask: np.ndarray | None = None  # (H, W) bool in published pixels, from /csref/target_mask


def ground_over_ros(scene: DemoScene, node: subprocess.Popen, timeout_s: float, want_mask: bool) -> Outcome:
    """Publish the scene until the node's Detection2D (and its latency in /diagnostics, and with
    `want_mask` its mask) arrives."""
    # ROS loads only here, so that --help and the argument and model checks work without it.
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rclpy.signals import SignalHandlerOptions
    from sensor_msgs.msg import Image
    from vision_msgs.msg import Detection2D

    from csref_ros.image_conversion import fill_image, image_to_array

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

        def on_mask(msg: Image) -> None:
            if outcome.mask is None:
                outcome.mask = image_to_array(msg)[:, :, 0] > 127  # mono8: 255 on the target

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
        if want_mask:
            ros_node.create_subscription(Image, "/csref/target_mask", on_mask, 10)

        deadline = time.monotonic() + timeout_s
        latency_deadline = None
        while time.monotonic() < deadline and outcome.node_error is None and node.poll() is None:
            rclpy.spin_once(ros_node, timeout_sec=0.05)
            if outcome.box is not None:
                latency_deadline = latency_deadline or time.monotonic() + 2.0  # the next diagnostics
                waiting = outcome.latency_ms is None or (want_mask and outcome.mask is None)
                if not waiting or time.monotonic() > latency_deadline:
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
def annotate(scene: DemoScene, outcome: Outcome, match_iou: float | None, path: Path, want_mask: bool) -> None:
    """The picture with the published mask (translucent, when the model has a mask head), box
    (solid, tagged with the command and score), the generator's target box (dashed, tagged
    "target") and a caption; written as PNG. Small scenes are enlarged so that the text stays
    legible."""
    said = f"said: {scene.said}" if scene.voice is None else f'said: "{scene.said}"  (voice {scene.voice}, {scene.speech_s:.1f} s)'
    result = "no box arrived" if outcome.box is None else f"box score {outcome.score:.2f}"
    if match_iou is not None:
        result += f"   IoU with the target {match_iou:.2f}: {'MATCH' if match_iou > MATCH_IOU else 'MISS'}"
    caption = [said, result]
    if outcome.latency_ms:
        caption.append(f"{outcome.latency_ms} ms from the end of speech to the box")
    if want_mask:
        caption.append("no mask arrived on /csref/target_mask" if outcome.mask is None
                       else f"mask: {int(outcome.mask.sum())} px on /csref/target_mask")
    boxes = []
    if outcome.box is not None:
        command = scene.said if scene.voice is not None else "your command"
        box = tuple(v / scene.scale for v in outcome.box)
        boxes.append(DrawnBox(box, label=f'"{command}"  {outcome.score:.2f}'))
    if scene.target_box is not None:
        boxes.append(DrawnBox(scene.target_box, colour=TARGET_COLOUR, label="target", dashed=True))
    base = scene.original if scene.original is not None else scene.image
    mask = None
    if outcome.mask is not None:  # published pixels -> the original picture's
        resized = cv2.resize(outcome.mask.astype(np.uint8), (base.shape[1], base.shape[0]), interpolation=cv2.INTER_NEAREST)
        mask = resized.astype(bool)
    save_picture(draw_boxes(base, boxes, caption, min_width=ANNOTATED_MIN_WIDTH, mask=mask), str(path))


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
    parser.add_argument("--voice", help="a voice of any installed engine: espeak-ng en-gb+f3, flite:slt, festival:kal "
                                        "(default: a held-out espeak-ng voice)")
    parser.add_argument("--seed", type=int, help=f"scene seed (default {DEFAULT_SEED})")
    parser.add_argument("--image", type=Path, help="your own picture (JPEG/PNG) instead of a generated scene")
    parser.add_argument("--audio", type=Path, help="your own recording (WAV/FLAC) of the command, with --image")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "demo", help="where the PNGs, WAV and logs go")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the box after the node starts")
    parser.add_argument("--answer", type=Path, help="an Im2Sp answer directory (python -m csref_training.im2sp "
                        "bundle): say which object was chosen, as answer.wav next to annotated.png")
    args = parser.parse_args(argv)
    if args.answer is not None and not (args.answer / ANSWER_LEXICON).is_file():
        parser.error(f"{args.answer} is not an Im2Sp answer directory (no {ANSWER_LEXICON}); make one with "
                     "python -m csref_training.im2sp bundle")
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


def report(scene: DemoScene, outcome: Outcome, out_dir: Path, node_log: Path, timeout_s: float,
           want_mask: bool) -> int:
    """Print the outcome, write annotated.png and result.json; the exit status."""
    match_iou = None
    if outcome.box is not None and scene.target_box is not None:
        match_iou = float(box_iou(np.asarray(outcome.box), np.asarray(scene.target_box)))
    annotated = out_dir / "annotated.png"
    annotate(scene, outcome, match_iou, annotated, want_mask)
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
        "mask_pixels": None if outcome.mask is None else int(outcome.mask.sum()),
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
    if want_mask:
        print("mask     none arrived on /csref/target_mask" if outcome.mask is None
              else f"mask     {int(outcome.mask.sum())} px from /csref/target_mask")
    print(f"picture  {annotated}")
    return 0


def speak_answer(answer_dir: Path, scene: DemoScene, outcome: Outcome, out_dir: Path) -> None:
    """The robot's spoken answer about the box it published (csref_model.im2sp.Answerer)."""
    try:
        answer = Answerer.from_directory(answer_dir).answer(scene.image, outcome.box)
    except RuntimeError as error:  # the decoder said nothing for this box
        print(f"answer   none: {error}")
        return
    sf.write(out_dir / "answer.wav", answer.waveform, answer.sample_rate, subtype="PCM_16")
    print(f'answer   "{answer.text}" ({len(answer.waveform) / answer.sample_rate:.1f} s, {out_dir / "answer.wav"})')


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

    domain_id, domain_lock = lock_domain_id(DOMAIN_IDS)
    env = loopback_environment(domain_id, FASTDDS_PROFILE, out_dir / "ros_log")
    os.environ.update(env)  # this process's own ROS participant, before rclpy starts
    node_log = out_dir / "node.log"
    print(f"node     model {checkpoint}, ROS domain {domain_id} on loopback, log {node_log}")
    want_mask = has_mask_head(checkpoint)
    node = start_node(checkpoint, scene.wav_path, env, node_log, publish_mask=want_mask)
    try:
        outcome = ground_over_ros(scene, node, args.timeout, want_mask)
        status = report(scene, outcome, out_dir, node_log, args.timeout, want_mask)
        if args.answer is not None and status == 0:
            speak_answer(args.answer, scene, outcome, out_dir)
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
