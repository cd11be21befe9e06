"""Control flow between a handler and the consumer runtime that is not an error of the request."""

from __future__ import annotations


class Abandoned(Exception):
    """The handler stopped without a final event (partition revoked, worker shutting down).

    The runtime publishes nothing more and does not commit the record, so its next owner (or this
    worker after a restart) handles it again; a training job resumes from its checkpoint.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Stopped(Exception):
    """The work was asked to stop (``reason``: ``"cancel"`` or ``"preempt"``) and stopped at a safe point: a
    dataset download between images, training at a step boundary after its checkpoint (``epoch``, ``step``:
    where it resumes). The handler turns it into a ``cancelled`` event or ``Abandoned``."""

    def __init__(self, reason: str, epoch: int = 0, step: int = 0) -> None:
        super().__init__(reason)
        self.reason, self.epoch, self.step = reason, epoch, step
