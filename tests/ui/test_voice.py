"""Voice prompts with the real offline Mandarin TTS (espeak-ng, voice cmn): audio is produced, and speaking never
blocks the caller."""

from __future__ import annotations

import time
import wave
from pathlib import Path

from ui.i18n import text
from ui.voice import MANDARIN_VOICE, EspeakSpeaker


def test_espeak_ng_renders_a_mandarin_prompt_to_audio(tmp_path: Path) -> None:
    speaker = EspeakSpeaker()
    wav = speaker.synthesize(text("voice.qr"), tmp_path / "prompt.wav")
    with wave.open(str(wav)) as audio:
        seconds = audio.getnframes() / audio.getframerate()
        frames = audio.readframes(audio.getnframes())
    assert seconds > 1.0  # a dozen syllables, slowly
    assert any(b != 0 for b in frames[: len(frames) // 2])  # not silence


def test_the_mandarin_voice_differs_from_the_default(tmp_path: Path) -> None:
    # espeak-ng silently falls back to English for an unknown voice: prove cmn is really there
    cmn = EspeakSpeaker(voice=MANDARIN_VOICE).synthesize("你好", tmp_path / "cmn.wav").read_bytes()
    en = EspeakSpeaker(voice="en").synthesize("你好", tmp_path / "en.wav").read_bytes()
    assert cmn != en


def test_say_returns_at_once_and_a_new_prompt_cuts_the_old_one_off() -> None:
    speaker = EspeakSpeaker()
    started = time.monotonic()
    speaker.say(text("error.body"))
    speaker.say(text("voice.identity"))
    assert time.monotonic() - started < 0.5
    speaker.stop()
