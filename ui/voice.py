"""Voice prompts: a `Speaker` seam, the offline Mandarin TTS (espeak-ng, voice `cmn`) and a recording fake.

Owns how a prompt becomes speech. `EspeakSpeaker.say` starts espeak-ng as a child process and returns at once (the
UI thread never waits for audio); a newer prompt cuts the previous one off, so the citizen hears the current step.
It must never speak personal data (view-models pass fixed catalogue phrases only) and never import Kivy.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Final, Protocol

logger = logging.getLogger(__name__)

MANDARIN_VOICE: Final = "cmn"
"""Debian espeak-ng's Mandarin voice (`espeak-ng --voices=zh` lists it as cmn, Chinese_(Mandarin))."""
WORDS_PER_MINUTE: Final = 140
"""Slower than espeak's 175 default: the care mode is for elderly citizens."""


class Speaker(Protocol):
    def say(self, phrase: str) -> None:
        """Start speaking `phrase` (cutting off anything still being spoken); never blocks."""

    def stop(self) -> None:
        """Stop speaking."""


class SilentSpeaker:
    """For kiosks without audio or with voice turned off."""

    def say(self, phrase: str) -> None:
        return None

    def stop(self) -> None:
        return None


class RecordingSpeaker:
    """Test fake: remembers every phrase."""

    def __init__(self) -> None:
        self.phrases: list[str] = []

    def say(self, phrase: str) -> None:
        self.phrases.append(phrase)

    def stop(self) -> None:
        return None


class EspeakSpeaker:
    """espeak-ng in a child process per phrase."""

    def __init__(self, executable: str = "espeak-ng", *, voice: str = MANDARIN_VOICE, wpm: int = WORDS_PER_MINUTE):
        found = shutil.which(executable)
        if found is None:
            raise FileNotFoundError(f"{executable} not found: install the Debian package espeak-ng")
        self._argv = [found, "-v", voice, "-s", str(wpm)]
        self._lock = threading.Lock()
        self._current: subprocess.Popen[bytes] | None = None

    def say(self, phrase: str) -> None:
        with self._lock:
            self._stop_locked()
            try:
                self._current = subprocess.Popen(
                    [*self._argv, "--", phrase],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            except OSError as exc:
                # A voice prompt is a help, never a reason to fail the step the citizen is on.
                logger.warning("voice prompt not spoken: %s", exc)

    def stop(self) -> None:
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        current, self._current = self._current, None
        if current is not None and current.poll() is None:
            current.terminate()
            try:
                current.wait(1.0)  # reaped here, so no zombie outlives the prompt
            except subprocess.TimeoutExpired:
                current.kill()
                current.wait(1.0)

    def synthesize(self, phrase: str, wav: Path, timeout_s: float = 30.0) -> Path:
        """Render `phrase` to a WAV file (blocking): what installers and tests use to check the voice works."""
        subprocess.run([*self._argv, "-w", str(wav), "--", phrase], check=True, capture_output=True, timeout=timeout_s)
        return wav
