"""Replay load test: a recorded robot session published from files at real rate into the node.

    .venv/bin/python scripts/replay_load_test.py --minutes 5
    .venv/bin/python scripts/replay_load_test.py --minutes 5 --checkpoint models/spoken_shapes_tiny --json out.json

1. Record (once; an existing --recording folder is reused): Spoken Shapes test scenes spoken by
   the generator's held-out espeak-ng voices (none of them in the demo model's training list),
   each letterboxed onto a fixed camera image, with an aligned synthetic depth image (16UC1 in
   mm: a sloping floor, every object a slab at its own depth), one camera_info, and one WAV in
   which each scene's command is spoken after a pause. timeline.json says which scene is on
   screen when, where its referent is in the image, and where it is in 3D (the analytic answer).
2. Replay, as `ros2 bag play` would: the node runs in its own process with audio_source=topic and
   use_depth=true; this process publishes image, depth and camera_info at --fps and the audio as
   int16 AudioStamped messages of 20 ms, each stamped with its recording time, looping the
   recording until --minutes have passed.
3. Report, every 10 s and as JSON at the end: commands spoken, answers received (box or empty
   array), box accuracy (IoU >= 0.5 with the referent), 3D point error against the analytic
   answer, latency from the end of speech to the answer (measured here, and the node's own
   figures), node memory, and what became of every command. A command with no answer that the
   node's diagnostics do not count as dropped is reported as lost; exit status 1 if any is.

Runs on loopback only, with its own ROS domain id and the shared-memory Fast DDS profile.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import rclpy
import soundfile
from audio_common_msgs.msg import AudioStamped
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PointStamped
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image
from vision_msgs.msg import Detection2DArray

from benchmark_node import rss_mb, wait_until_active  # scripts/, the node benchmark beside this one
from csref_model.audio import SAMPLE_RATE, load_audio_16k
from csref_model.boxes import box_iou
from csref_ros.image_conversion import fill_image
from csref_ros.loopback import loopback_environment
from csref_ros.messages import s_to_time, time_to_s

REPO_ROOT = Path(__file__).resolve().parent.parent
CAMERA_WIDTH, CAMERA_HEIGHT = 640, 480
FOCAL_PX = 525.0  # a Kinect/RealSense-like colour camera at 640x480
FLOOR_NEAR_M, FLOOR_FAR_M = 1.2, 2.4  # depth of the floor at the bottom and the top row
OBJECT_NEAR_M, OBJECT_STEP_M = 0.6, 0.07  # object k of a scene stands at NEAR + k * STEP
PAUSE_BEFORE_S, PAUSE_AFTER_S = 1.2, 1.6
AUDIO_CHUNK_S = 0.02
AUDIBLE = 0.02  # |sample| above this (-34 dBFS) is speech; the TTS clips end with 0.1-0.5 s below it
DEPTH_SYNC_TOLERANCE_S = 0.05  # the node's default depth_sync_tolerance_s
SETTLE_S = 8.0  # commands that ended this close to the stop are not counted: their answer may still be on its way


@dataclass(frozen=True)
class Scene:
    index: int
    shown_s: float  # the scene is on screen from shown_s to the next scene's shown_s (recording time)
    speech_end_s: float  # the last audible sample of the command (the clip's trailing silence excluded)
    text: str
    voice: str
    box_xyxy: tuple[float, float, float, float]  # the referent in camera pixels
    point_m: tuple[float, float, float]  # the referent's box centre in the optical frame


def letterbox_to_camera(image: np.ndarray) -> tuple[np.ndarray, float, float, float]:
    """A scene of any size, scaled to fit the camera image and centred: (camera image, scale, dx, dy)."""
    height, width = image.shape[:2]
    scale = min(CAMERA_WIDTH / width, CAMERA_HEIGHT / height)
    new_w, new_h = round(width * scale), round(height * scale)
    dx, dy = (CAMERA_WIDTH - new_w) // 2, (CAMERA_HEIGHT - new_h) // 2
    camera = np.full((CAMERA_HEIGHT, CAMERA_WIDTH, 3), 114, np.uint8)
    camera[dy : dy + new_h, dx : dx + new_w] = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    return camera, scale, dx, dy


def depth_image(object_boxes: list[tuple[float, float, float, float]]) -> np.ndarray:
    """(H, W) uint16 mm: the floor, and object k a slab at OBJECT_NEAR_M + k * OBJECT_STEP_M over its box."""
    rows = np.linspace(FLOOR_FAR_M, FLOOR_NEAR_M, CAMERA_HEIGHT, dtype=np.float32)  # the top row is farthest
    depth_m = np.repeat(rows[:, None], CAMERA_WIDTH, axis=1)
    # Farthest first, so that a nearer slab hides a farther one where boxes overlap, as in a real view.
    for k in sorted(range(len(object_boxes)), key=lambda k: -k):
        x1, y1, x2, y2 = object_boxes[k]
        cols = slice(int(np.ceil(x1 - 0.5)), int(np.ceil(x2 - 0.5)))  # pixels whose centres lie in the box
        rows_in = slice(int(np.ceil(y1 - 0.5)), int(np.ceil(y2 - 0.5)))
        depth_m[rows_in, cols] = OBJECT_NEAR_M + k * OBJECT_STEP_M
    return np.round(depth_m * 1000).astype(np.uint16)


def analytic_point(box_xyxy: tuple[float, ...], depth_m: float) -> tuple[float, float, float]:
    """The box centre at depth_m through the pinhole model (pixel i covers [i, i + 1); cx is a pixel index)."""
    u, v = (box_xyxy[0] + box_xyxy[2]) / 2, (box_xyxy[1] + box_xyxy[3]) / 2
    cx, cy = (CAMERA_WIDTH - 1) / 2, (CAMERA_HEIGHT - 1) / 2
    return (u - 0.5 - cx) * depth_m / FOCAL_PX, (v - 0.5 - cy) * depth_m / FOCAL_PX, depth_m


def record(folder: Path, scenes: int, seed: int) -> None:
    """Generate the scenes with the Spoken Shapes generator and write the recording into `folder`."""
    generated = folder / "spoken_shapes"
    subprocess.run(
        [sys.executable, "-m", "csref_training.spoken_shapes", "--out", str(generated), "--seed", str(seed),
         "--train", "0", "--val", "0", "--test", str(scenes), "--voice-set", "heldout", "--no-noise", "--workers", "1"],
        check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
    )
    entries = json.loads((generated / "anns" / "spoken_shapes.json").read_text())["test"]
    (folder / "frames").mkdir(exist_ok=True)
    (folder / "depth").mkdir(exist_ok=True)
    timeline, audio, now_s = [], [], 0.0
    for index, entry in enumerate(entries):
        image = cv2.imread(str(generated / "images" / f"{entry['iid']:012d}.jpg"))  # BGR
        camera_bgr, scale, dx, dy = letterbox_to_camera(image)
        boxes = [(x * scale + dx, y * scale + dy, (x + w) * scale + dx, (y + h) * scale + dy)
                 for x, y, w, h in (obj["bbox"] for obj in entry["objects"])]
        target = entry["target_index"]
        cv2.imwrite(str(folder / "frames" / f"{index:04d}.png"), camera_bgr)
        cv2.imwrite(str(folder / "depth" / f"{index:04d}.png"), depth_image(boxes))
        ref = entry["refs"][0]
        speech = load_audio_16k(generated / "audios" / "spoken_shapes" / ref["speaker"] / f"{ref['sent_id']}.wav")
        silence_before, silence_after = (np.zeros(round(s * SAMPLE_RATE), np.float32) for s in (PAUSE_BEFORE_S, PAUSE_AFTER_S))
        audio += [silence_before, speech, silence_after]
        audible = np.flatnonzero(np.abs(speech) > AUDIBLE)
        speech_end_s = now_s + PAUSE_BEFORE_S + (audible[-1] + 1) / SAMPLE_RATE
        timeline.append({
            "index": index, "shown_s": round(now_s, 4), "speech_end_s": round(speech_end_s, 4), "text": ref["sent"],
            "voice": ref["speaker"], "box_xyxy": [round(v, 2) for v in boxes[target]],
            "point_m": [round(v, 5) for v in analytic_point(boxes[target], OBJECT_NEAR_M + target * OBJECT_STEP_M)],
        })
        now_s += PAUSE_BEFORE_S + speech.size / SAMPLE_RATE + PAUSE_AFTER_S
    samples = np.concatenate(audio)
    soundfile.write(folder / "audio.wav", samples, SAMPLE_RATE, subtype="PCM_16")
    (folder / "timeline.json").write_text(json.dumps({
        "duration_s": round(now_s, 4), "sample_rate": SAMPLE_RATE, "camera": [CAMERA_WIDTH, CAMERA_HEIGHT],
        "focal_px": FOCAL_PX, "voices": "Spoken Shapes heldout list", "scenes": timeline,
    }, indent=1))


def load_scenes(folder: Path) -> tuple[dict, list[Scene]]:
    meta = json.loads((folder / "timeline.json").read_text())
    scenes = [Scene(s["index"], s["shown_s"], s["speech_end_s"], s["text"], s["voice"], tuple(s["box_xyxy"]),
                    tuple(s["point_m"])) for s in meta["scenes"]]
    return meta, scenes


class Player:
    """Publishes the recording at real rate from its own thread, looping; stamps = start + recording time."""

    def __init__(self, node: Node, folder: Path, meta: dict, scenes: list[Scene], fps: float) -> None:
        self.node, self.folder, self.scenes, self.fps = node, folder, scenes, fps
        self.duration_s = meta["duration_s"]
        self.audio = np.round(load_audio_16k(folder / "audio.wav") * 2**15).astype(np.int16)  # (N,)
        self.image_pub = node.create_publisher(Image, "camera/image_raw", qos_profile_sensor_data)
        self.depth_pub = node.create_publisher(Image, "camera/aligned_depth_to_color/image_raw", qos_profile_sensor_data)
        self.info_pub = node.create_publisher(CameraInfo, "camera/aligned_depth_to_color/camera_info", qos_profile_sensor_data)
        self.audio_pub = node.create_publisher(AudioStamped, "audio", qos_profile_sensor_data)
        self.info = CameraInfo(width=CAMERA_WIDTH, height=CAMERA_HEIGHT, distortion_model="plumb_bob")
        cx, cy = (CAMERA_WIDTH - 1) / 2, (CAMERA_HEIGHT - 1) / 2
        self.info.k = [FOCAL_PX, 0.0, cx, 0.0, FOCAL_PX, cy, 0.0, 0.0, 1.0]
        self.info.d = [0.0] * 5
        self.info.header.frame_id = "camera_color_optical_frame"
        self.start_s = 0.0
        self.frames_published = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.run, daemon=True)

    def scene_at(self, wall_s: float) -> Scene | None:
        """The scene on screen at wall time wall_s (None before the start)."""
        if wall_s < self.start_s:
            return None
        offset = (wall_s - self.start_s) % self.duration_s
        shown = [s for s in self.scenes if s.shown_s <= offset]
        return shown[-1]

    def spoken(self, until_s: float) -> list[tuple[int, Scene, float]]:
        """(pass, scene, wall time of its end of speech) of every command whose speech ended before until_s."""
        result, loop = [], 0
        while True:
            base = self.start_s + loop * self.duration_s
            ended = [(loop, s, base + s.speech_end_s) for s in self.scenes if base + s.speech_end_s < until_s]
            result += ended
            if len(ended) < len(self.scenes):
                return result
            loop += 1

    def images(self, scene: Scene) -> tuple[Image, Image]:
        rgb = cv2.imread(str(self.folder / "frames" / f"{scene.index:04d}.png"))[:, :, ::-1]
        depth = cv2.imread(str(self.folder / "depth" / f"{scene.index:04d}.png"), cv2.IMREAD_UNCHANGED)
        colour, aligned = Image(), Image()
        fill_image(colour, np.ascontiguousarray(rgb), "rgb8")
        fill_image(aligned, depth, "16UC1")
        colour.header.frame_id = aligned.header.frame_id = self.info.header.frame_id
        return colour, aligned

    def run(self) -> None:
        try:
            self.play()
        except BaseException as error:  # reported by main(), which stops the test
            self.error = error
            raise

    def play(self) -> None:
        chunk = round(AUDIO_CHUNK_S * SAMPLE_RATE)
        frame_n = audio_n = 0
        shown, messages = None, None
        while not self.stop.is_set():
            frame_s = self.start_s + frame_n / self.fps
            chunk_end_s = self.start_s + (audio_n + 1) * chunk / SAMPLE_RATE  # a capturer publishes a chunk once recorded
            wait = min(frame_s, chunk_end_s) - time.time()
            if wait > 0:
                time.sleep(wait)
            if frame_s <= chunk_end_s:
                scene = self.scene_at(frame_s)
                if scene is not shown:
                    shown, messages = scene, self.images(scene)
                colour, aligned = messages
                colour.header.stamp = aligned.header.stamp = self.info.header.stamp = s_to_time(frame_s)
                self.image_pub.publish(colour)
                self.depth_pub.publish(aligned)
                self.info_pub.publish(self.info)
                self.frames_published += 1
                frame_n += 1
            else:
                begin = (audio_n * chunk) % self.audio.size
                part = np.take(self.audio, np.arange(begin, begin + chunk), mode="wrap")
                msg = AudioStamped()
                msg.header.stamp = s_to_time(chunk_end_s - chunk / SAMPLE_RATE)
                msg.audio.audio_data.int16_data = part
                msg.audio.info.format, msg.audio.info.channels = 8, 1  # paInt16, mono
                msg.audio.info.rate, msg.audio.info.chunk = SAMPLE_RATE, chunk
                self.audio_pub.publish(msg)
                audio_n += 1


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    return {"p50": round(float(np.percentile(values, 50)), 1), "p95": round(float(np.percentile(values, 95)), 1),
            "max": round(float(max(values)), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(REPO_ROOT / "models" / "spoken_shapes_tiny"))
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--recording", default="", help="recording folder (made if it has no timeline.json); default: a temporary one")
    parser.add_argument("--scenes", type=int, default=60, help="scenes in a new recording (about 3.5 s each)")
    parser.add_argument("--seed", type=int, default=4242, help="generator seed of a new recording")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--fps", type=float, default=30.0, help="image + depth + camera_info rate")
    parser.add_argument("--vad-backend", default="silero")
    parser.add_argument("--threads", type=int, default=0, help="node inference threads (0 = default)")
    parser.add_argument("--domain-id", type=int, default=102 + os.getpid() % 10, help="102..111 never meet the tests")
    parser.add_argument("--json", default="", help="also write the summary here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="csref_replay_"))
    folder = Path(args.recording) if args.recording else work / "recording"
    if not (folder / "timeline.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        print(f"recording {args.scenes} scenes into {folder} ...", flush=True)
        record(folder, args.scenes, args.seed)
    meta, scenes = load_scenes(folder)

    # rclpy reads these when it initialises, below.
    os.environ.update(loopback_environment(args.domain_id, REPO_ROOT / "config" / "fastdds_loopback.xml"))

    node_log = open(work / "node.log", "w")
    parameters = {
        "model_checkpoint": args.checkpoint, "backend": args.backend, "num_threads": args.threads,
        "audio_source": "topic", "use_depth": True, "vad_backend": args.vad_backend, "top_k": 1,
    }
    node_command = [sys.executable, "-m", "csref_ros.grounding_node", "--ros-args",
                    *[arg for name, value in parameters.items() for arg in ("-p", f"{name}:={value}")]]
    node = subprocess.Popen(node_command, stdout=node_log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)

    rclpy.init()
    client = rclpy.create_node("replay_player")
    answers: list[tuple[float, float, Detection2DArray]] = []  # (wall time received, frame stamp, message)
    points: dict[float, PointStamped] = {}  # by the stamp of the depth frame used
    diagnostics: dict[str, str] = {}

    def on_diagnostics(msg: DiagnosticArray) -> None:
        for status in msg.status:
            if "speech grounding" in status.name:
                diagnostics.update({kv.key: kv.value for kv in status.values})

    client.create_subscription(Detection2DArray, "csref/detections",
                               lambda msg: answers.append((time.time(), time_to_s(msg.header.stamp), msg)), 50)
    client.create_subscription(PointStamped, "csref/target_point", lambda msg: points.__setitem__(time_to_s(msg.header.stamp), msg), 50)
    client.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
    player = Player(client, folder, meta, scenes, args.fps)
    executor = SingleThreadedExecutor()
    executor.add_node(client)
    threading.Thread(target=executor.spin, daemon=True).start()

    wait_until_active(node, diagnostics, work / "node.log")
    player.start_s = time.time() + 0.5
    player.thread.start()
    memory = [(0.0, rss_mb(node.pid))]
    while time.time() - player.start_s < args.minutes * 60:
        time.sleep(10.0)
        if player.error is not None or node.poll() is not None:
            node.kill()
            sys.exit(f"stopped: the player failed ({player.error!r})" if player.error is not None
                     else f"stopped: the node exited with status {node.returncode}; see {work / 'node.log'}")
        memory.append((time.time() - player.start_s, rss_mb(node.pid)))
        print(f"{memory[-1][0]:6.0f} s  commands spoken {len(player.spoken(time.time()))}  answers {len(answers)}  "
              f"points {len(points)}  frames {player.frames_published}  node latency p50/p95 "
              f"{diagnostics.get('latency_end_of_speech_to_publish_p50_ms')}/"
              f"{diagnostics.get('latency_end_of_speech_to_publish_p95_ms')} ms  RSS {memory[-1][1]:.0f} MB", flush=True)
    stopped_s = time.time()
    player.stop.set()
    player.thread.join()
    time.sleep(SETTLE_S)  # answers to the last commands, and the last diagnostics
    node.send_signal(2)
    node.wait(timeout=30)
    executor.shutdown()
    client.destroy_node()
    rclpy.try_shutdown()

    summary = summarise(player, answers, points, diagnostics, stopped_s - SETTLE_S, memory)
    summary.update(model=args.checkpoint, backend=diagnostics.get("backend"), vad_backend=args.vad_backend,
                   recording=str(folder), node_log=str(work / "node.log"))
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    if summary["commands"]["lost"]:
        sys.exit(f"{summary['commands']['lost']} commands were neither answered nor counted as dropped by the node")


def summarise(player: Player, answers: list, points: dict, diagnostics: dict[str, str], counted_until_s: float,
              memory: list[tuple[float, float]]) -> dict:
    """Every spoken command matched to its answer by the frame the answer was grounded on."""
    spoken = player.spoken(counted_until_s)
    by_command: dict[tuple[int, int], list] = {}
    for received_s, frame_s, msg in answers:
        loop = int((frame_s - player.start_s) // player.duration_s)
        scene = player.scene_at(frame_s)
        by_command.setdefault((loop, scene.index), []).append((received_s, frame_s, msg))
    correct, boxes, empty, latencies, point_errors_mm, per_command = 0, 0, 0, [], [], []
    for loop, scene, speech_end_s in spoken:
        record = {"pass": loop, "scene": scene.index, "text": scene.text, "voice": scene.voice}
        per_command.append(record)
        replies = by_command.get((loop, scene.index), [])
        if not replies:
            continue
        received_s, frame_s, msg = replies[0]
        latencies.append((received_s - speech_end_s) * 1000)
        record["latency_ms"] = round(latencies[-1], 1)
        if not msg.detections:
            empty += 1
            continue
        boxes += 1
        bbox = msg.detections[0].bbox
        box = (bbox.center.position.x - bbox.size_x / 2, bbox.center.position.y - bbox.size_y / 2,
               bbox.center.position.x + bbox.size_x / 2, bbox.center.position.y + bbox.size_y / 2)
        record["iou"] = round(float(box_iou(np.array(box), np.array(scene.box_xyxy))), 3)
        if record["iou"] >= 0.5:
            correct += 1
            # The depth frame paired with the colour frame may be another one within depth_sync_tolerance_s.
            depth_s = min(points, key=lambda s: abs(s - frame_s), default=None)
            point = points[depth_s] if depth_s is not None and abs(depth_s - frame_s) <= DEPTH_SYNC_TOLERANCE_S else None
            if point is not None:
                error = np.subtract((point.point.x, point.point.y, point.point.z), scene.point_m)
                point_errors_mm.append(float(np.linalg.norm(error)) * 1000)
                record["point_error_mm"] = round(point_errors_mm[-1], 1)
    answered = sum(1 for loop, scene, _ in spoken if (loop, scene.index) in by_command)
    extra = sum(len(v) - 1 for v in by_command.values())
    count = {key: int(diagnostics.get(key, 0)) for key in (
        "utterances", "utterances_dropped_short", "utterances_dropped_queue_full", "utterances_without_frame",
        "depth_frames_missing", "targets_without_depth", "targets_located", "inference_errors", "images",
        "images_lost", "audio_messages", "audio_messages_rejected", "audio_stream_restarts", "depth_images")}
    explained = count["utterances_dropped_queue_full"] + count["utterances_without_frame"] + count["inference_errors"]
    unheard = max(0, len(spoken) - count["utterances"] + count["utterances_dropped_short"])
    settled = [rss for t, rss in memory if t >= 60.0] or [memory[-1][1]]
    return {
        "seconds": round(memory[-1][0]),
        "camera": f"{CAMERA_WIDTH}x{CAMERA_HEIGHT} rgb8 + 16UC1 depth + camera_info at {player.fps:g} Hz",
        "frames_published": player.frames_published,
        "commands": {
            "spoken": len(spoken), "answered": answered, "answered_with_box": boxes, "answered_empty": empty,
            "extra_answers": extra, "not_heard_as_speech": unheard, "dropped_by_node": explained,
            "lost": max(0, len(spoken) - answered - explained - unheard),
        },
        "accuracy_iou50": round(correct / boxes, 3) if boxes else None,
        "points_for_correct_boxes": len(point_errors_mm),
        "point_error_mm": percentiles(point_errors_mm),
        "latency_end_of_speech_to_answer_ms": percentiles(latencies),
        "node_latency_end_of_speech_to_publish_ms": {
            "p50": diagnostics.get("latency_end_of_speech_to_publish_p50_ms"),
            "p95": diagnostics.get("latency_end_of_speech_to_publish_p95_ms"),
        },
        "node_counters": count,
        "node_rss_mb": {"start": round(memory[0][1]), "after_1_min": round(settled[0]), "end": round(memory[-1][1]),
                        "max": round(max(rss for _, rss in memory))},
        "per_command": per_command,
    }


if __name__ == "__main__":
    main()
