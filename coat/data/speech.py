"""Offline speech with espeak-ng through ctypes (the library and its data ship in `espeakng-loader`).

libespeak-ng keeps static state across utterances (pitch-flutter phase, wave phase, its RNG), so the same call
gives different samples depending on what was spoken before. coat-mini must be byte-identical whatever order
the workers render clips in, so every utterance runs on a freshly loaded library: a private copy of the .so
(nobody else holds it, so `dlclose` really unloads it) is loaded, initialised, used and closed per call
(about 8 ms).
"""

import _ctypes
import atexit
import ctypes
import shutil
import tempfile
import threading
from pathlib import Path

import espeakng_loader
import numpy as np

_SYNCHRONOUS = 2  # AUDIO_OUTPUT_SYNCHRONOUS: espeak_Synth returns after every chunk reached the callback
_UTF8_ENDPAUSE = 0x1001  # espeakCHARS_UTF8 | espeakENDPAUSE
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4  # espeak_PARAMETER
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

_private_lib: Path | None = None
_chunks: list[np.ndarray] = []
_lock = threading.Lock()


@_CALLBACK
def _on_audio(wav, num_samples, events):
    if num_samples > 0 and wav:
        _chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
    return 0  # 0 = keep synthesising


def _library_path() -> Path:
    global _private_lib
    if _private_lib is None:
        tmp = Path(tempfile.mkdtemp(prefix="coat-espeak-"))
        atexit.register(shutil.rmtree, tmp, True)
        _private_lib = Path(shutil.copy(espeakng_loader.get_library_path(), tmp / "libespeak-ng.so"))
    return _private_lib


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f"speak: {name}={value} is outside espeak-ng's range [{low}, {high}]")


def _synthesize(lib: ctypes.CDLL, text: bytes, voice: str, params: tuple[tuple[int, int], ...]) -> int:
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                 ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    rate = lib.espeak_Initialize(_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
    if rate <= 0:
        raise RuntimeError(f"espeak_Initialize failed ({rate}), data {espeakng_loader.get_data_path()}")
    lib.espeak_SetSynthCallback(_on_audio)
    lib.espeak_ng_SetRandSeed(0)
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise ValueError(f"speak: espeak-ng has no voice {voice!r}")
    for param, value in params:
        lib.espeak_SetParameter(param, value, 0)
    status = lib.espeak_Synth(text, len(text) + 1, 0, 0, 0, _UTF8_ENDPAUSE, None, None)
    lib.espeak_Synchronize()
    if status != 0 or not _chunks:
        raise RuntimeError(f"speak: espeak-ng produced no audio for {text.decode()!r} (status {status})")
    return rate


def speak(text: str, *, voice: str = "en", rate: int = 175, pitch: int = 50, pitch_range: int = 50,
          volume: int = 100) -> tuple[np.ndarray, int]:
    """Render `text` with espeak-ng; return (float32 mono waveform in [-1, 1], its sample rate).

    `voice` is an espeak-ng voice name, optionally with a variant ("en", "en+f3", "en-us+m3"); `rate` is in
    words per minute, `pitch` and `pitch_range` are 0-100, `volume` 0-200 (100 = normal). The sample rate is
    espeak-ng's own (22050 Hz); callers resample. The same arguments always give the same samples.

    Raises:
        ValueError: empty text, a parameter outside espeak-ng's range, or a voice espeak-ng does not know.
        RuntimeError: espeak-ng failed to initialise or to synthesise.
    """
    if not text.strip():
        raise ValueError("speak: text is empty")
    _check_range("rate", rate, 80, 450)
    _check_range("pitch", pitch, 0, 100)
    _check_range("pitch_range", pitch_range, 0, 100)
    _check_range("volume", volume, 0, 200)
    params = ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range), (_VOLUME, volume))
    with _lock:
        _chunks.clear()
        lib = ctypes.CDLL(str(_library_path()))
        try:
            sample_rate = _synthesize(lib, text.encode(), voice, params)
            wav = np.concatenate(_chunks).astype(np.float32) / 32768.0
        finally:
            lib.espeak_Terminate()
            _ctypes.dlclose(lib._handle)
            _chunks.clear()
    return wav, sample_rate
