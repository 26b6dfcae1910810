"""ONNX export of the three node graphs: files, opset, dynamic axes, ONNX Runtime parity (tiny random
weights and the base oracle), the model-hash cache, the CLI, and the TensorRT build where it exists;
the mask head's graphs and masks through every CPU backend."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from csref_model.checkpoint import save_checkpoint
from csref_model.config import ModelConfig, load_model_config
from csref_model.grounder import Grounder
from csref_model.head import best_cell
from csref_model.preprocessing import letterbox
from csref_model.runtime.contract import GRAPHS, MASK_GRAPH, Backend, Manifest
from csref_model.runtime.export import OPSET, ensure_onnx, export_onnx, model_hash
from csref_model.runtime.onnxruntime_backend import OnnxRuntimeBackend
from csref_model.runtime.tensorrt_backend import EngineSettings, TensorRTBackend, build_engines, profile_shapes
from csref_model.srec import build_srec
from csref_model.typed_yaml import merge
from training_support import TEST_MODEL

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny():
    config = load_model_config("tiny")
    torch.manual_seed(0)
    return build_srec(config, load_pretrained=False).eval(), config


@pytest.fixture(scope="module")
def tiny_export(tiny, tmp_path_factory):
    model, config = tiny
    directory = tmp_path_factory.mktemp("tiny_onnx")
    return directory, export_onnx(model, config, directory)


def session(path: Path) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_graph_files_opset_and_axes(tiny_export, tiny):
    directory, manifest = tiny_export
    _, config = tiny
    assert manifest.opset >= 17 and manifest.model_hash == model_hash(*tiny)
    assert Manifest.read(directory) == manifest
    graphs = {name: onnx.load(str(directory / manifest.graphs[name]), load_external_data=False) for name in GRAPHS}
    for graph in graphs.values():
        onnx.checker.check_model(graph)
        assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= OPSET
    speech = graphs["speech_encoder"].graph
    assert [i.name for i in speech.input] == ["input_values", "attention_mask"]
    assert dims(speech.input[0]) == ["speech_batch", "samples"] and dims(speech.input[1]) == ["speech_batch", "samples"]
    assert speech.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT32
    assert dims(speech.output[0]) == ["speech_batch", config.speech_encoder.output_dim]
    image = graphs["image_encoder"].graph
    size = config.image_size
    assert dims(image.input[0]) == ["image_batch", 3, size, size]  # fixed input size
    assert [o.name for o in image.output] == ["s8", "s16", "s32"]
    head = graphs["grounding_head"].graph
    assert [i.name for i in head.input] == ["s8", "s16", "s32", "speech_feat"]
    assert [o.name for o in head.output] == ["cells"]
    assert dims(head.output[0])[1:] == [(size // 32) ** 2, 5]  # every cell of the head's grid


def test_onnxruntime_matches_torch_tiny(tiny_export, tiny):
    directory, manifest = tiny_export
    model, config = tiny
    size = config.image_size
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, size, size, generator=generator)
    # A padded batch of three utterances (2.0 s, 1.3 s, 0.5 s), then each one alone.
    lengths = [32000, 20800, 8000]
    input_values = torch.zeros(3, max(lengths))
    attention_mask = torch.zeros(3, max(lengths), dtype=torch.int32)
    for row, length in enumerate(lengths):
        input_values[row, :length] = torch.randn(length, generator=generator)
        attention_mask[row, :length] = 1
    sessions = {name: session(directory / manifest.graphs[name]) for name in GRAPHS}
    with torch.no_grad():
        maps = model.encode_image(image)
        speech = model.encode_speech(input_values, attention_mask)
        cells_broadcast = model.ground_cells([m[:1] for m in maps], speech)  # one frame, three utterances
        cells_paired = model.ground_cells(maps, speech[:2])
        # The cells' best is the model's answer (ground_features), the graph contract's invariant.
        torch.testing.assert_close(best_cell(cells_paired), model.ground_features(maps, speech[:2]), rtol=0, atol=0)
    onnx_maps = sessions["image_encoder"].run(None, {"image": image.numpy()})
    for mine, expected in zip(onnx_maps, maps):
        np.testing.assert_allclose(mine, expected.numpy(), rtol=0, atol=1e-4)
    onnx_speech = sessions["speech_encoder"].run(None, {"input_values": input_values.numpy(),
                                                        "attention_mask": attention_mask.numpy()})[0]
    np.testing.assert_allclose(onnx_speech, speech.numpy(), rtol=0, atol=1e-5)
    for row, length in enumerate(lengths):
        alone = sessions["speech_encoder"].run(None, {"input_values": input_values[row:row + 1, :length].numpy(),
                                                      "attention_mask": np.ones((1, length), np.int32)})[0]
        with torch.no_grad():
            expected = model.encode_speech(input_values[row:row + 1, :length], torch.ones(1, length, dtype=torch.int32))
        np.testing.assert_allclose(alone, expected.numpy(), rtol=0, atol=1e-5)
    head = sessions["grounding_head"]
    feeds = {"s8": maps[0][:1].numpy(), "s16": maps[1][:1].numpy(), "s32": maps[2][:1].numpy(),
             "speech_feat": speech.numpy()}
    np.testing.assert_allclose(head.run(None, feeds)[0], cells_broadcast.numpy(), rtol=0, atol=1e-3)
    feeds = {"s8": maps[0].numpy(), "s16": maps[1].numpy(), "s32": maps[2].numpy(), "speech_feat": speech[:2].numpy()}
    np.testing.assert_allclose(head.run(None, feeds)[0], cells_paired.numpy(), rtol=0, atol=1e-3)


def test_ensure_onnx_reuses_matching_graphs_and_reexports_stale_ones(tiny, tmp_path, caplog):
    model, config = tiny
    directory, manifest = ensure_onnx(model, config, tmp_path / "graphs")
    first_mtime = (directory / "speech_encoder.onnx").stat().st_mtime_ns
    again, _ = ensure_onnx(model, config, directory)
    assert (again / "speech_encoder.onnx").stat().st_mtime_ns == first_mtime  # reused, not rewritten

    changed = build_srec(config, load_pretrained=False).eval()
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.head.obj_preds[0].bias.add_(1.0)
    with caplog.at_level("WARNING", logger="csref_model.runtime.export"):
        _, new_manifest = ensure_onnx(changed, config, directory)
    assert new_manifest.model_hash != manifest.model_hash and "re-exporting" in caplog.text

    (directory / "grounding_head.onnx").write_bytes(b"truncated")
    caplog.clear()
    with caplog.at_level("WARNING", logger="csref_model.runtime.export"):
        _, repaired = ensure_onnx(changed, config, directory)
    assert "re-exporting" in caplog.text and onnx.load(str(directory / "grounding_head.onnx")) is not None
    assert repaired.model_hash == new_manifest.model_hash


def test_onnxruntime_base_matches_the_oracle(base_oracle, tmp_path):
    model, config, oracle = base_oracle
    manifest = export_onnx(model, config, tmp_path)
    backend = OnnxRuntimeBackend(tmp_path, "cpu", threads=2)
    x, tolerances = oracle["inputs"], oracle["tolerances"]
    speech = backend.encode_speech(x["input_values"], x["attention_mask"])
    boxes = best_cell(backend.ground_features(backend.encode_image(x["image"]), speech))
    reference = oracle["outputs"]["boxes"]
    assert manifest.opset >= 17
    assert (speech - oracle["intermediates"]["speech_flat_feat"]).abs().max() <= tolerances["speech_flat_feat"]
    assert (boxes[:, :4] - reference[:, :4]).abs().max() <= tolerances["boxes_xyxy_px"]  # 0.1 px
    assert (boxes[:, 4] - reference[:, 4]).abs().max() <= tolerances["boxes_score"]


def run_export_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "csref_model", "export", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=420)


def test_export_cli_onnx_and_user_errors(tiny, tmp_path):
    model, config = tiny
    checkpoint = save_checkpoint(tmp_path / "tiny", model, config)
    completed = run_export_cli("--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "out"))
    assert completed.returncode == 0, completed.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["model_hash"] == model_hash(model, config) and set(manifest["graphs"]) == set(GRAPHS)
    for name in GRAPHS:
        assert (tmp_path / "out" / f"{name}.onnx").is_file() and f"{name}.onnx" in completed.stdout
    cases = [
        (["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "x")], "checkpoint not found"),
        (["--checkpoint", str(checkpoint), "--out", str(tmp_path / "x"), "--fp16"], "--fp16 applies to --format tensorrt"),
        (["--checkpoint", str(checkpoint), "--out", str(tmp_path / "x"), "--opset", "13"], "opset 13 is too old"),
    ]
    for args, message in cases:
        completed = run_export_cli(*args)
        assert completed.returncode == 2 and message in completed.stderr and "Traceback" not in completed.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines need a CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                    reason="tensorrt is not importable here (the TensorRT builder is not installable on these machines)")
def test_tensorrt_engines_match_onnxruntime(tiny_export, tiny, tmp_path):
    directory, manifest = tiny_export
    model, config = tiny
    settings = EngineSettings(fp16=False, max_audio_seconds=4.0, max_batch=2)
    engines = build_engines(directory, manifest, settings, cache_dir=tmp_path)
    assert set(engines) == set(GRAPHS)
    backend = TensorRTBackend(directory, manifest, settings, "cuda", cache_dir=tmp_path)
    assert isinstance(backend, Backend)
    reference = OnnxRuntimeBackend(directory, "cpu")
    generator = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, config.image_size, config.image_size, generator=generator)
    input_values = torch.randn(1, 24000, generator=generator)
    attention_mask = torch.ones(1, 24000, dtype=torch.int32)
    speech = backend.encode_speech(input_values, attention_mask)
    expected_speech = reference.encode_speech(input_values, attention_mask)
    torch.testing.assert_close(speech.cpu(), expected_speech, rtol=0, atol=1e-3)
    boxes = backend.ground_features(backend.encode_image(image), speech).cpu()
    expected = reference.ground_features(reference.encode_image(image), expected_speech)
    torch.testing.assert_close(boxes, expected, rtol=0, atol=0.1)
    assert backend.rebuilt == []  # build_engines left up-to-date engines in the cache
    # An engine whose key says another TensorRT version built it is rebuilt, not run.
    key_path = tmp_path / "speech_encoder.engine.json"
    key = json.loads(key_path.read_text())
    key["tensorrt"] = "9.0.0"
    key_path.write_text(json.dumps(key))
    again = TensorRTBackend(directory, manifest, settings, "cuda", cache_dir=tmp_path)
    assert again.rebuilt == ["speech_encoder"]
    torch.testing.assert_close(again.encode_speech(input_values, attention_mask), speech, rtol=0, atol=1e-4)


def test_tensorrt_profiles_cover_the_audio_range_and_batch():
    settings = EngineSettings(max_audio_seconds=5.0, max_batch=3, min_samples=400)
    speech = profile_shapes("speech_encoder", {"input_values": (-1, -1), "attention_mask": (-1, -1)}, settings)
    assert speech["input_values"] == ((1, 400), (1, 48000), (3, 80000)) == speech["attention_mask"]
    head = profile_shapes("grounding_head", {"s32": (-1, 1024, 13, 13), "speech_feat": (-1, 768)}, settings)
    assert head["s32"] == ((1, 1024, 13, 13), (1, 1024, 13, 13), (3, 1024, 13, 13))
    short = profile_shapes("speech_encoder", {"input_values": (-1, -1)}, EngineSettings(max_audio_seconds=1.0))
    assert short["input_values"][1] == (1, 16000)  # opt never exceeds max
    with pytest.raises(ValueError, match="shorter than the shortest utterance"):
        profile_shapes("speech_encoder", {"input_values": (-1, -1)}, EngineSettings(max_audio_seconds=0.01))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_export_cli_tensorrt_without_gpu_says_why(tiny, tmp_path):
    model, config = tiny
    checkpoint = save_checkpoint(tmp_path / "tiny", model, config)
    completed = run_export_cli("--checkpoint", str(checkpoint), "--format", "tensorrt", "--fp16",
                               "--out", str(tmp_path / "out"))
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert "TensorRT is not installed" in completed.stderr or "needs a CUDA GPU" in completed.stderr
    assert (tmp_path / "out" / "manifest.json").is_file()  # the ONNX graphs it builds from are kept


def test_mask_head_graphs_and_masks_through_every_cpu_backend(tmp_path):
    # A model with a mask head exports a fourth graph and s4 from the image encoder; torch and ONNX
    # Runtime give the same logits and the Grounder's mask (original-image pixels) from either.
    overrides = merge(TEST_MODEL, {"mask_head": {"enabled": True, "hidden_size": 8}})
    config = ModelConfig.from_dict(merge(load_model_config("tiny").to_dict(), overrides))
    torch.manual_seed(0)
    model = build_srec(config, load_pretrained=False).eval()
    manifest = export_onnx(model, config, tmp_path / "graphs")
    assert set(manifest.graphs) == {*GRAPHS, MASK_GRAPH}
    image_graph = onnx.load(str(tmp_path / "graphs" / manifest.graphs["image_encoder"]))
    assert [o.name for o in image_graph.graph.output] == ["s8", "s16", "s32", "s4"]
    mask_graph = onnx.load(str(tmp_path / "graphs" / manifest.graphs[MASK_GRAPH]))
    assert [i.name for i in mask_graph.graph.input] == ["s8", "s16", "s32", "s4", "speech_feat"]

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(90, 140, 3), dtype=np.uint8)
    audio = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    results, speech_of = {}, {}
    for backend in ("torch", "onnxruntime"):
        grounder = Grounder.from_model(model, config, backend=backend, onnx_dir=tmp_path / "graphs")
        assert grounder.has_mask
        features = grounder.encode_image(image)
        assert len(features.maps) == 4
        speech = grounder.encode_speech(audio).feature
        results[backend] = grounder.backend.mask_features(features.maps, speech)
        result = grounder.ground(image, audio)
        assert result.mask.shape == (90, 140) and result.mask.dtype == bool
        np.testing.assert_array_equal(result.mask, grounder.ground_features(features, grounder.encode_speech(audio)).mask)
        speech_of[backend] = speech
    with torch.no_grad():
        maps = model.encode_image_pyramid(letterbox(image, config.image_size)[0][None])
        expected = model.mask_features(maps, speech_of["torch"])
    assert results["torch"].shape == (1, 2, config.image_size // 4, config.image_size // 4)
    torch.testing.assert_close(results["onnxruntime"], results["torch"], rtol=0, atol=1e-3)
    torch.testing.assert_close(results["torch"], expected, rtol=0, atol=1e-3)


def test_box_only_model_exports_three_graphs_and_gives_no_mask(tiny_export, tiny):
    directory, manifest = tiny_export
    model, config = tiny
    assert set(manifest.graphs) == set(GRAPHS) and not config.mask_head.enabled
    grounder = Grounder.from_model(model, config, backend="onnxruntime", onnx_dir=directory)
    assert not grounder.has_mask
    result = grounder.ground(np.zeros((64, 64, 3), dtype=np.uint8), np.zeros(16000, dtype=np.float32) + 0.01)
    assert result.mask is None
    with pytest.raises(RuntimeError, match="no mask head"):
        grounder.backend.mask_features(grounder.encode_image(np.zeros((64, 64, 3), dtype=np.uint8)).maps,
                                       torch.zeros(1, config.speech_encoder.output_dim))
