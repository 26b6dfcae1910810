"""The spoken command: espeak-ng voices, text to speech, silence padding and additive noise
(docs/SPOKEN_SHAPES.md, "Speech").

Voices. TRAIN_VOICES (the generator's default) is every English espeak-ng voice, bare and with
each of TRAIN_VARIANTS; HELDOUT_VOICES pairs the same voices with the disjoint HELDOUT_VARIANTS,
for cross-speaker evaluation.
"""

from __future__ import annotations

import functools
import re
import struct
import subprocess
from pathlib import Path

import numpy as np

from csref_model.audio import SAMPLE_RATE, resample

ESPEAK_SAMPLE_RATE = 22050
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
VOICE_SETS = {"train": TRAIN_VOICES, "heldout": HELDOUT_VOICES}


def espeak_version() -> str:
    """`espeak-ng --version`'s line, e.g. "eSpeak NG text-to-speech: 1.51 ... Data at: ..."."""
    try:
        return subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    except FileNotFoundError as err:
        raise RuntimeError("espeak-ng is not installed; install the Debian package `espeak-ng`") from err


@functools.lru_cache(maxsize=1)
def espeak_data_dir() -> Path:
    """espeak-ng's data directory, as printed by `espeak-ng --version`."""
    version = espeak_version()
    match = re.search(r"Data at:\s*(\S+)", version)
    if match is None:
        raise RuntimeError(f"cannot find the data directory in `espeak-ng --version` output: {version!r}")
    return Path(match.group(1))


def check_voices(voices: list[str]) -> None:
    """Raises ValueError listing every voice espeak-ng does not have.

    espeak-ng silently ignores an unknown `+variant`, so variants are checked against its files.
    """
    listing = subprocess.run(["espeak-ng", "--voices"], capture_output=True, text=True, check=True).stdout
    languages = {line.split()[1] for line in listing.splitlines()[1:] if len(line.split()) > 1}
    variants = {p.name for p in (espeak_data_dir() / "voices" / "!v").iterdir()}
    bad = []
    for voice in voices:
        language, _, variant = voice.partition("+")
        if language not in languages or (variant and variant not in variants):
            bad.append(voice)
    if bad:
        raise ValueError(
            f"unknown espeak-ng voice(s): {', '.join(bad)}. Voices are `language+variant`; see "
            f"`espeak-ng --voices` for languages and {espeak_data_dir() / 'voices' / '!v'} for variants."
        )


def speaker_dir_name(voice: str) -> str:
    """File-system safe speaker directory name for a voice string."""
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", voice)


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
    cmd = ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text]
    proc = subprocess.run(cmd, capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"espeak-ng failed ({' '.join(cmd)}): {proc.stderr.decode(errors='replace')}")
    return _parse_espeak_wav(proc.stdout).astype(np.float32) / 32768.0


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


def render_speech(
    rng: np.random.Generator,
    text: str,
    voice: str,
    rate: int,
    pitch: int,
    snr_db: float | None,
) -> np.ndarray:
    """float32 utterance at SAMPLE_RATE: espeak-ng speech, trimmed, padded with 0.1-0.5 s silence
    on each side, peak level drawn from [0.3, 0.9], optional additive noise at `snr_db`."""
    speech = resample(espeak(text, voice, rate, pitch), ESPEAK_SAMPLE_RATE)
    loud = np.flatnonzero(np.abs(speech) > 0.01 * np.abs(speech).max())
    speech = speech[loud[0]:loud[-1] + 1]
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

    espeak-ng prints no word timings, so each word is synthesised on its own with the same voice,
    rate and pitch, trimmed to where it is louder than 1% of its peak, and the words are joined
    with silent gaps drawn from `gap_s`: the alignment is exact by construction, at the price of
    no coarticulation across word boundaries. Silence padding, level and noise as `render_speech`.
    """
    pieces, spans = [], []
    position = int(rng.uniform(0.1, 0.5) * SAMPLE_RATE)
    pieces.append(np.zeros(position, dtype=np.float32))
    for index, word in enumerate(words):
        if index:
            gap = int(rng.uniform(*gap_s) * SAMPLE_RATE)
            pieces.append(np.zeros(gap, dtype=np.float32))
            position += gap
        spoken = resample(espeak(word, voice, rate, pitch), ESPEAK_SAMPLE_RATE)
        loud = np.flatnonzero(np.abs(spoken) > 0.01 * np.abs(spoken).max())
        spoken = spoken[loud[0]:loud[-1] + 1]
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
