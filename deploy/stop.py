"""Stop strings over a stream of output text, as the OpenAI API defines them (and vLLM implements them):
generation ends before the first occurrence of any stop string, which is not part of the output.

``StopChecker.feed(text)`` takes the next piece of decoded text and returns what may be sent now and whether
a stop string was hit. Text that could be the start of a stop string is held back until the next piece
decides it (vLLM's detokenizer does the same), so a stop string split across tokens is found and never
half-sent; ``flush()`` returns what is held back when the output ends without a stop.

``active=False`` (the output is still below ``min_tokens``) passes text through unsearched: vLLM checks stop
strings only once ``min_tokens`` tokens exist.
"""

from typing import Sequence


class StopChecker:
    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(s for s in stop if s)
        self._held = ""

    def __bool__(self) -> bool:
        return bool(self.stop)

    def feed(self, text: str, *, active: bool = True) -> tuple[str, bool]:
        """(text to send now, stopped)."""
        text = self._held + text
        self._held = ""
        if not self.stop or not active:
            return text, False
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            return text[:cut], True
        keep = self._partial(text)
        if keep:
            self._held = text[-keep:]
            text = text[:-keep]
        return text, False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _partial(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string (0 if none)."""
        longest = min(len(text), max(len(s) for s in self.stop) - 1)
        for n in range(longest, 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
