"""A completion read as it is decoded: ``TextStream`` is the ``GenerationConfig.on_token`` hook of one
prompt's decoding, and ``stream_pieces`` runs the decoding in a thread and hands out the text pieces.

Why text pieces cut this way: byte-level BPE splits a character across tokens, so a piece is sent only
when the decoded text does not end inside a character; the pieces then join to exactly the text the
finished row decodes to (``trim`` of the row, what ``generate.py`` prints), and the last piece is taken
from that final text, so a reader that joins them and one that waits for the end see the same sonnet.
Greedy decoding, sampling and contrastive search stream; beam search keeps its beams open to the end
(``GenerationConfig`` refuses the hook there), so its caller shows only the final text.

A reader that stops early (the generator closed: a browser tab closed) sets ``TextStream.stopped``; the
next step's hook then raises ``_Stopped``, which ends the decoding thread, so it does not go on to
``max_new_tokens`` on the same cached model while the next request decodes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import torch

from models.generation import trim

_DONE = object()


class _Stopped(Exception):
    """Raised by the hook once the reader has gone: it unwinds the decoding, and the thread swallows it."""


class TextStream:
    """The text of row 0 (one prompt, no padding) as it grows: call it with the tokens so far after
    each step (``on_token``); ``pieces`` holds the new text of each step that ends on a whole character."""

    def __init__(self, decode: Callable[[list[int]], str], eos_token_id: int | None) -> None:
        self.decode, self.eos = decode, eos_token_id
        self.prompt_len: int | None = None
        self.sent = ""  # the text handed out so far
        self.pieces: queue.SimpleQueue = queue.SimpleQueue()
        self.stopped = threading.Event()  # set when the reader stops reading
        self.thread: threading.Thread | None = None  # the decoding thread of ``stream_pieces``

    def __call__(self, seqs: torch.Tensor) -> None:  # (N, cur): the first call has one new token
        if self.stopped.is_set():
            raise _Stopped
        if self.prompt_len is None:
            self.prompt_len = seqs.size(1) - 1
        text = self.decode(trim(seqs[0], self.prompt_len, 0, self.eos))
        if len(text) > len(self.sent) and not text.endswith("\ufffd"):
            self.pieces.put(text[len(self.sent):])
            self.sent = text


def stream_pieces(stream: TextStream, run: Callable[[], str]) -> Iterator[str]:
    """Run ``run`` (a decoding that calls ``stream``; returns the final text) in a thread and yield the
    text pieces as they come, then the rest of the final text: the pieces join to ``run()``'s result.
    An error of ``run`` is raised here, in the reader's thread."""
    result: list = []

    def work() -> None:
        try:
            result.append(run())
        except _Stopped:  # the reader has gone: nobody to hand the text to
            pass
        except BaseException as e:  # handed to the reader, which raises it
            result.append(e)
        finally:
            stream.pieces.put(_DONE)

    stream.thread = threading.Thread(target=work, daemon=True, name="decode")
    stream.thread.start()
    shown = ""
    try:
        while (piece := stream.pieces.get()) is not _DONE:
            shown += piece
            yield piece
    finally:  # also on close(): the decoding stops at its next step
        stream.stopped.set()
    if isinstance(result[0], BaseException):
        raise result[0]
    final = result[0]
    if not final.startswith(shown):
        raise RuntimeError(f"the streamed text {shown!r} is not the start of the final text {final!r}")
    if len(final) > len(shown):
        yield final[len(shown):]


__all__ = ["TextStream", "stream_pieces"]
