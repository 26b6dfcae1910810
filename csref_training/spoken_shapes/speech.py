"""The spoken command: text to speech with espeak-ng, flite or festival, silence padding and
additive noise (docs/SPOKEN_SHAPES.md, "Speech").

Voices are engine-aware strings `engine:name`; a bare name is an espeak-ng voice, as before:

    en-gb+f3, espeak:en-gb+f3    espeak-ng voice `language+variant` (Debian `espeak-ng`)
    flite:kal, flite:slt, ...    flite's built-in voices kal (8 kHz), kal16, slt, rms, awb (`flite`)
    festival:kal, festival:ked   festival diphone voices (`festival festvox-kallpc16k festvox-kdlpc16k`)
    festival:slt_hts             festival's HTS voice (`festival festvox-us-slt-hts`)

`synthesize(text, voice, rate, pitch)` renders any of them to float32 at SAMPLE_RATE. `rate`
(words per minute) and `pitch` (0-99) are espeak-ng's units; the other engines map them to a
duration stretch ESPEAK_DEFAULT_RATE / rate and a pitch shift of (pitch - 50) / 10 semitones
(flite: duration_stretch, int_f0_target_mean; festival diphones: Duration_Stretch,
int_lr_params). flite:rms and festival:slt_hts take the rate only: their pitch cannot be set.

Voice lists (VOICE_SETS), training and held-out disjoint within each engine:
    train / heldout                   espeak-ng: every English voice with TRAIN_VARIANTS /
                                      HELDOUT_VARIANTS (`train` is the generator's default)
    flite-train / flite-heldout       kal, kal16, awb, rms / slt
    festival-train / festival-heldout kal, ked / slt_hts
Speakers shared ACROSS engines: flite:kal, flite:kal16 and festival:kal are all built from the
same male speaker's diphones; flite:slt and festival:slt_hts from the same female speaker (CMU
ARCTIC slt). A model trained on `flite-train` has therefore never heard slt: `festival-heldout`
is then new in both engine and speaker.
"""

from __future__ import annotations

import functools
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csref_model.audio import SAMPLE_RATE, load_audio, resample

ENGINES = ("espeak", "flite", "festival")
# What to `apt install` for each engine (Debian 12).
ENGINE_PACKAGES = {
    "espeak": "espeak-ng",
    "flite": "flite",
    "festival": "festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts",
}
ESPEAK_SAMPLE_RATE = 22050
ESPEAK_DEFAULT_RATE = 175  # words per minute; the other engines' natural speed is mapped to it
# The 8 native English espeak-ng voices.
ENGLISH_VOICES = (
    "en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan",
    "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc",
)
# espeak-ng variants (files in espeak-ng-data/voices/!v) used for training. Strongly
# distorted variants (whisper, robots, echo effects) are left out of both lists.
TRAIN_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f4",
    "Alex", "Andrea", "Andy", "Annie", "Denis", "Gene", "Jacky", "Lee", "Mario", "Michael",
    "Mike", "aunty", "belinda", "boris", "david", "ed", "edward", "grandma", "iven2", "klatt",
    "klatt3", "linda", "max", "paul", "quincy", "robert", "shelby", "steph", "travis", "victor",
)
# Disjoint from TRAIN_VARIANTS: for cross-speaker evaluation only.
HELDOUT_VARIANTS = (
    "m8", "f3", "f5", "Alicia", "anika", "gustave", "john", "kaukovalta",
    "klatt2", "marcelo", "norbert", "rob",
)
TRAIN_VOICES = ENGLISH_VOICES + tuple(
    f"{voice}+{variant}" for voice in ENGLISH_VOICES for variant in TRAIN_VARIANTS
)
HELDOUT_VOICES = tuple(f"{voice}+{variant}" for voice in ENGLISH_VOICES for variant in HELDOUT_VARIANTS)

# flite voice -> its natural mean F0 in Hz (measured on our commands), the centre of the pitch
# shift; None: the voice ignores int_f0_target_mean (and f0_shift), so its pitch stays its own.
# flite's limited-domain awb_time (it only tells the time) is left out.
FLITE_VOICES: dict[str, float | None] = {"kal": 95.0, "kal16": 95.0, "slt": 170.0, "rms": None, "awb": 130.0}


@dataclass(frozen=True)
class FestivalVoice:
    select: str  # the Scheme function that selects the voice
    package: str  # the Debian package that ships it
    f0_mean: float | None  # int_lr_params of a diphone voice (its /festvox/*.scm); None: HTS voice
    f0_std: float | None


FESTIVAL_VOICES = {
    "kal": FestivalVoice("voice_kal_diphone", "festvox-kallpc16k", 105.0, 14.0),
    "ked": FestivalVoice("voice_ked_diphone", "festvox-kdlpc16k", 105.0, 15.0),
    "slt_hts": FestivalVoice("voice_cmu_us_slt_arctic_hts", "festvox-us-slt-hts", None, None),
}
FESTIVAL_MODEL_F0 = (170.0, 34.0)  # model_f0_mean/std of both diphone voices' intonation models

FLITE_TRAIN_VOICES = ("flite:kal", "flite:kal16", "flite:awb", "flite:rms")
FLITE_HELDOUT_VOICES = ("flite:slt",)
FESTIVAL_TRAIN_VOICES = ("festival:kal", "festival:ked")
FESTIVAL_HELDOUT_VOICES = ("festival:slt_hts",)
VOICE_SETS = {
    "train": TRAIN_VOICES,
    "heldout": HELDOUT_VOICES,
    "flite-train": FLITE_TRAIN_VOICES,
    "flite-heldout": FLITE_HELDOUT_VOICES,
    "festival-train": FESTIVAL_TRAIN_VOICES,
    "festival-heldout": FESTIVAL_HELDOUT_VOICES,
}


@dataclass(frozen=True)
class Voice:
    engine: str  # one of ENGINES
    name: str  # the engine's own voice name

    @property
    def canonical(self) -> str:
        """espeak-ng voices bare (`en-us+m3`), the others `engine:name`."""
        return self.name if self.engine == "espeak" else f"{self.engine}:{self.name}"


def parse_voice(voice: str) -> Voice:
    """`engine:name` or a bare espeak-ng name -> Voice; ValueError for an unknown engine."""
    engine, colon, name = voice.partition(":")
    if not colon:
        engine, name = "espeak", voice
    if engine not in ENGINES:
        raise ValueError(f"unknown TTS engine {engine!r} in voice {voice!r}; engines are {', '.join(ENGINES)}")
    if not name:
        raise ValueError(f"voice {voice!r} names no {engine} voice")
    return Voice(engine, name)


def _require(program: str, engine: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise RuntimeError(f"{engine} is not installed ({program} not found); install the Debian package(s) `{ENGINE_PACKAGES[engine]}`")
    return path


def _run(cmd: list[str], engine: str) -> subprocess.CompletedProcess:
    _require(cmd[0], engine)
    proc = subprocess.run(cmd, capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} failed ({' '.join(cmd)}): {proc.stderr.decode(errors='replace')}")
    return proc


def espeak_version() -> str:
    """`espeak-ng --version`'s line, e.g. "eSpeak NG text-to-speech: 1.51 ... Data at: ..."."""
    return _run(["espeak-ng", "--version"], "espeak").stdout.decode().strip()


def engine_version(engine: str) -> str:
    """The engine's version line, for provenance."""
    if engine == "espeak":
        return espeak_version()
    if engine == "flite":
        # flite --version exits with status 1 after printing its version.
        lines = subprocess.run([_require("flite", "flite"), "--version"], capture_output=True, text=True, timeout=60).stdout.splitlines()
        return next((line.strip() for line in lines if "version" in line), " ".join(lines).strip())
    return _run(["festival", "--version"], "festival").stdout.decode().strip()


@functools.lru_cache(maxsize=1)
def espeak_data_dir() -> Path:
    """espeak-ng's data directory, as printed by `espeak-ng --version`."""
    version = espeak_version()
    match = re.search(r"Data at:\s*(\S+)", version)
    if match is None:
        raise RuntimeError(f"cannot find the data directory in `espeak-ng --version` output: {version!r}")
    return Path(match.group(1))


@functools.lru_cache(maxsize=1)
def installed_flite_voices() -> frozenset[str]:
    """Voices `flite -lv` lists."""
    listing = _run(["flite", "-lv"], "flite").stdout.decode()
    return frozenset(listing.partition(":")[2].split())


@functools.lru_cache(maxsize=1)
def installed_festival_voices() -> frozenset[str]:
    """Scheme names of the voices festival finds (`voice.list`), e.g. kal_diphone."""
    listing = _run(["festival", "--batch", "(print (voice.list))"], "festival").stdout.decode()
    return frozenset(listing.strip().strip("()").split())


def _check_espeak_voices(names: list[str]) -> list[str]:
    """The espeak-ng names that are not voices; an unknown `+variant` is silently ignored by
    espeak-ng, so variants are checked against its files."""
    listing = _run(["espeak-ng", "--voices"], "espeak").stdout.decode()
    languages = {line.split()[1] for line in listing.splitlines()[1:] if len(line.split()) > 1}
    variants = {p.name for p in (espeak_data_dir() / "voices" / "!v").iterdir()}
    bad = []
    for name in names:
        language, _, variant = name.partition("+")
        if language not in languages or (variant and variant not in variants):
            bad.append(name)
    return bad


def check_voices(voices: list[str]) -> None:
    """Raises ValueError listing every voice that is not available (unknown engine, unknown or
    uninstalled voice), and RuntimeError when an engine used is not installed."""
    parsed = [parse_voice(voice) for voice in voices]
    problems = []
    espeak_names = [v.name for v in parsed if v.engine == "espeak"]
    if espeak_names:
        bad = _check_espeak_voices(espeak_names)
        if bad:
            problems.append(
                f"unknown espeak-ng voice(s): {', '.join(bad)}. Voices are `language+variant`; see "
                f"`espeak-ng --voices` for languages and {espeak_data_dir() / 'voices' / '!v'} for variants"
            )
    flite_names = sorted({v.name for v in parsed if v.engine == "flite"})
    if flite_names:
        bad = [n for n in flite_names if n not in FLITE_VOICES]
        missing = [n for n in flite_names if n in FLITE_VOICES and n not in installed_flite_voices()]
        if bad:
            problems.append(f"unknown flite voice(s): {', '.join(bad)}; flite voices are {', '.join(FLITE_VOICES)}")
        if missing:
            problems.append(f"flite voice(s) {', '.join(missing)} not in `flite -lv`; install the Debian package `flite`")
    festival_names = sorted({v.name for v in parsed if v.engine == "festival"})
    if festival_names:
        bad = [n for n in festival_names if n not in FESTIVAL_VOICES]
        if bad:
            problems.append(f"unknown festival voice(s): {', '.join(bad)}; festival voices are {', '.join(FESTIVAL_VOICES)}")
        known = [n for n in festival_names if n in FESTIVAL_VOICES]
        if known:
            installed = installed_festival_voices()
            for name in known:
                if FESTIVAL_VOICES[name].select.removeprefix("voice_") not in installed:
                    problems.append(f"festival voice {name} is not installed; install the Debian package `{FESTIVAL_VOICES[name].package}`")
    if problems:
        raise ValueError("; ".join(problems))


def speaker_dir_name(voice: str) -> str:
    """File-system safe speaker directory name for a voice string (espeak-ng voices bare)."""
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", parse_voice(voice).canonical)


def _parse_espeak_wav(data: bytes) -> np.ndarray:
    """int16 mono samples from espeak-ng's --stdout WAV (its size fields are not filled in)."""
    if len(data) < 44 or data[:4] != b"RIFF" or data[8:12] != b"WAVE" or data[12:16] != b"fmt ":
        raise RuntimeError("espeak-ng did not write a WAV stream")
    fmt, channels, rate = struct.unpack("<HHI", data[20:28])
    bits = struct.unpack("<H", data[34:36])[0]
    if (fmt, channels, rate, bits) != (1, 1, ESPEAK_SAMPLE_RATE, 16) or data[36:40] != b"data":
        raise RuntimeError(f"unexpected espeak-ng WAV format {(fmt, channels, rate, bits)}")
    payload = data[44:]
    return np.frombuffer(payload[: len(payload) // 2 * 2], dtype="<i2")


def espeak(text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    """Speech for `text` as float32 in [-1, 1] at ESPEAK_SAMPLE_RATE (22050 Hz)."""
    # "--": text starting with "-" is text, not an option.
    cmd = ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", "--", text]
    return _parse_espeak_wav(_run(cmd, "espeak").stdout).astype(np.float32) / 32768.0


def duration_stretch(rate: int) -> float:
    """espeak-ng words per minute -> duration factor of an engine whose natural speed is ESPEAK_DEFAULT_RATE."""
    if rate <= 0:
        raise ValueError(f"speaking rate must be > 0 words per minute, got {rate}")
    return ESPEAK_DEFAULT_RATE / rate


def pitch_factor(pitch: int) -> float:
    """espeak-ng pitch 0-99 (50 = the voice's own) -> F0 factor, (pitch - 50) / 10 semitones."""
    return 2.0 ** ((pitch - 50) / 10 / 12)


def flite(text: str, voice: str, rate: int, pitch: int) -> tuple[np.ndarray, int]:
    """flite speech for `text` -> (float32 wave, its sample rate: 8 kHz for kal, else 16 kHz)."""
    with tempfile.TemporaryDirectory(prefix="csref_flite_") as tmp:
        text_path, wav_path = Path(tmp) / "text.txt", Path(tmp) / "speech.wav"
        text_path.write_text(text)  # a file, not argv: flite would take text starting with "-" for an option
        cmd = ["flite", "-voice", voice, "--setf", f"duration_stretch={duration_stretch(rate):.4f}"]
        if FLITE_VOICES[voice] is not None:
            cmd += ["--setf", f"int_f0_target_mean={FLITE_VOICES[voice] * pitch_factor(pitch):.2f}"]
        _run(cmd + ["-f", str(text_path), "-o", str(wav_path)], "flite")
        return load_audio(wav_path)


def festival(text: str, voice: str, rate: int, pitch: int) -> tuple[np.ndarray, int]:
    """festival (text2wave) speech for `text` -> (float32 wave, its sample rate: 16 kHz, HTS 32 kHz)."""
    spec = FESTIVAL_VOICES[voice]
    # Every Scheme expression is built from our own numbers and names, never from `text`.
    settings = [f"({spec.select})"]
    if spec.f0_mean is None:  # HTS: its engine's speed, -r (> 1 is faster)
        settings.append(f'(set! hts_engine_params (append hts_engine_params (list (list "-r" {1 / duration_stretch(rate):.4f}))))')
    else:
        factor = pitch_factor(pitch)
        model_mean, model_std = FESTIVAL_MODEL_F0
        settings.append(f"(Parameter.set 'Duration_Stretch {duration_stretch(rate):.4f})")
        settings.append(
            f"(set! int_lr_params '((target_f0_mean {spec.f0_mean * factor:.2f}) (target_f0_std {spec.f0_std * factor:.2f}) "
            f"(model_f0_mean {model_mean}) (model_f0_std {model_std})))"
        )
    with tempfile.TemporaryDirectory(prefix="csref_festival_") as tmp:
        text_path, wav_path = Path(tmp) / "text.txt", Path(tmp) / "speech.wav"
        text_path.write_text(text)
        cmd = ["text2wave", str(text_path), "-o", str(wav_path)]
        for expression in settings:
            cmd += ["-eval", expression]
        _run(cmd, "festival")
        return load_audio(wav_path)


def synthesize(text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    """Speech for `text` in any engine's `voice` (see the module docstring) as float32 at SAMPLE_RATE.

    `rate` in words per minute and `pitch` 0-99 are espeak-ng's units, mapped for the other engines.
    """
    parsed = parse_voice(voice)
    if parsed.engine == "espeak":
        return resample(espeak(text, parsed.name, rate, pitch), ESPEAK_SAMPLE_RATE)
    if parsed.engine == "flite":
        if parsed.name not in FLITE_VOICES:
            raise ValueError(f"unknown flite voice {parsed.name!r}; flite voices are {', '.join(FLITE_VOICES)}")
        wave, sample_rate = flite(text, parsed.name, rate, pitch)
    else:
        if parsed.name not in FESTIVAL_VOICES:
            raise ValueError(f"unknown festival voice {parsed.name!r}; festival voices are {', '.join(FESTIVAL_VOICES)}")
        wave, sample_rate = festival(text, parsed.name, rate, pitch)
    return resample(wave, sample_rate)


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit-power white, pink or brown noise."""
    white = rng.standard_normal(n)
    colour = rng.choice(["white", "pink", "brown"])
    if colour != "white":
        spectrum = np.fft.rfft(white)
        freqs = np.maximum(np.arange(len(spectrum)), 1.0)
        spectrum /= np.sqrt(freqs) if colour == "pink" else freqs
        white = np.fft.irfft(spectrum, n)
    return white / max(float(np.sqrt(np.mean(white ** 2))), 1e-12)


AUDIBLE_FRACTION = 0.01  # of the peak: where synthesised speech is trimmed


def trim_to_audible(wave: np.ndarray) -> np.ndarray:
    """`wave` from its first to its last sample louder than AUDIBLE_FRACTION of its peak."""
    loud = np.flatnonzero(np.abs(wave) > AUDIBLE_FRACTION * np.abs(wave).max())
    return wave[loud[0]:loud[-1] + 1]


def render_speech(
    rng: np.random.Generator,
    text: str,
    voice: str,
    rate: int,
    pitch: int,
    snr_db: float | None,
) -> np.ndarray:
    """float32 utterance at SAMPLE_RATE: `synthesize`d speech in any engine's voice, trimmed, padded
    with 0.1-0.5 s silence on each side, peak level drawn from [0.3, 0.9], optional additive
    noise at `snr_db`."""
    speech = trim_to_audible(synthesize(text, voice, rate, pitch))
    speech *= rng.uniform(0.3, 0.9) / np.abs(speech).max()
    lead, trail = (int(rng.uniform(0.1, 0.5) * SAMPLE_RATE) for _ in range(2))
    wave = np.concatenate([np.zeros(lead), speech, np.zeros(trail)])
    if snr_db is not None:
        speech_power = float(np.mean(speech.astype(np.float64) ** 2))
        wave = wave + _noise(rng, len(wave)) * np.sqrt(speech_power / 10 ** (snr_db / 10))
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def render_word_sequence(
    rng: np.random.Generator,
    words: list[str],
    voice: str,
    rate: int,
    pitch: int,
    snr_db: float | None,
    gap_s: tuple[float, float] = (0.03, 0.12),
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """float32 utterance at SAMPLE_RATE and each word's (start, end) in seconds.

    No engine here prints word timings, so each word is synthesised on its own (`synthesize`: any
    engine's voice) with the same voice, rate and pitch, trimmed to where it is louder than 1% of
    its peak, and the words are joined with silent gaps drawn from `gap_s`: the alignment is exact
    by construction, at the price of no coarticulation across word boundaries. Silence padding,
    level and noise as `render_speech`.
    """
    pieces, spans = [], []
    position = int(rng.uniform(0.1, 0.5) * SAMPLE_RATE)
    pieces.append(np.zeros(position, dtype=np.float32))
    for index, word in enumerate(words):
        if index:
            gap = int(rng.uniform(*gap_s) * SAMPLE_RATE)
            pieces.append(np.zeros(gap, dtype=np.float32))
            position += gap
        spoken = trim_to_audible(synthesize(word, voice, rate, pitch))
        pieces.append(spoken)
        spans.append((position / SAMPLE_RATE, (position + len(spoken)) / SAMPLE_RATE))
        position += len(spoken)
    pieces.append(np.zeros(int(rng.uniform(0.1, 0.5) * SAMPLE_RATE), dtype=np.float32))
    wave = np.concatenate(pieces).astype(np.float64)
    wave *= rng.uniform(0.3, 0.9) / np.abs(wave).max()
    if snr_db is not None:
        speech_power = float(np.mean(np.concatenate([wave[round(s * SAMPLE_RATE):round(e * SAMPLE_RATE)]
                                                     for s, e in spans]) ** 2))
        wave = wave + _noise(rng, len(wave)) * np.sqrt(speech_power / 10 ** (snr_db / 10))
    return np.clip(wave, -1.0, 1.0).astype(np.float32), spans
