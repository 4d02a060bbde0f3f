"""From generated token ids to the text a client sees, piece by piece.

:class:`TextTracker` decodes the whole answer so far after each token and hands out only
what is safe to show: never the replacement character of a multi-byte character whose
bytes are still arriving, never text that may turn out to be the start of a stop
sequence, and nothing from the first stop sequence on (OpenAI does not return the stop
sequence). Concatenating every piece gives exactly :attr:`TextTracker.text`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

INCOMPLETE = "\ufffd"  # what a tokenizer decodes the first bytes of an unfinished character to


class TextTracker:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # the answer so far, cut before the first stop sequence
        self.sent = ""  # what has been handed out
        self.stopped = False  # a stop sequence was generated

    def add(self, ids: Sequence[int]) -> str:
        """Take newly generated token ids; return the text that may be shown now (maybe empty)."""
        if self.stopped:
            return ""
        self.ids.extend(int(i) for i in ids)
        full = self._decode(self.ids)
        cut = self._first_stop(full)
        if cut is not None:
            self.stopped = True
            self.text = full[:cut]
            return self._emit(self.text)
        self.text = full
        safe = full.rstrip(INCOMPLETE)
        return self._emit(safe[:len(safe) - self._partial_stop(safe)])

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        return self._emit(self.text, final=True)

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(found) if found else None

    def _partial_stop(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop sequence (and could still complete it)."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _emit(self, safe: str, final: bool = False) -> str:
        if safe.startswith(self.sent):
            piece, self.sent = safe[len(self.sent):], safe
            return piece
        # Decoding more tokens changed text already shown (rare tokenizer clean-ups): show the
        # rest once it is final, and make `text` what the client has actually received.
        if final:
            common = 0
            while common < min(len(safe), len(self.sent)) and safe[common] == self.sent[common]:
                common += 1
            piece = safe[common:]
            self.text = self.sent + piece
            self.sent = self.text
            return piece
        return ""
