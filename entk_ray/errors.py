"""The errors a user fixes by changing an input, and how they are recognized wherever they surface.

Every expected failure of a run derives from :class:`UserInputError`: a bad config value
(``ConfigError``), a checkpoint that does not fit or is not one (``CheckpointError``,
``WeightsNotFoundError``), unreadable images (``CorruptImagesError``, ``ImageReadError``), a
stored artifact that cannot be used (``ArtifactError``) or a storage endpoint that does not
answer (:class:`StorageError`). The message names the input and what to do. Two things follow
from the class, in one place each:

* the command line (:func:`entk_ray.cli.run_cli`) prints ``error: <message>`` and exits with
  status 2 instead of a traceback (``--debug`` shows it);
* the Ray layer does not retry them: recomputing a shard cannot fix a truncated JPEG, and the
  storage client has already retried the request (``entk_ray.storage``).

Anything else is a bug or a crash and keeps its traceback (and its retries).

Errors raised in Ray workers reach the driver wrapped (``RayTaskError`` whose ``cause`` is the
original, sometimes inside a ``RuntimeError`` of ours); :func:`find_user_error` looks through
those layers.
"""
from __future__ import annotations


class UserInputError(Exception):
    """An expected failure: the message names the input and what to do (see the module doc)."""


class StorageError(UserInputError, OSError):
    """A storage endpoint (e.g. S3) did not answer within the configured timeouts and retries."""


def find_user_error(exc: BaseException | None) -> UserInputError | None:
    """The innermost :class:`UserInputError` in ``exc``'s chain of causes (``raise … from``, and
    Ray's ``cause``), or None. (Not ``__context__``: an error raised while another was being
    handled is a new error, not that one.)

    Innermost because Ray's wrapper of a worker's error is an instance of the error's class too
    (``RayTaskError(ImageReadError)``) but its message is the worker's whole traceback; the
    original in its ``cause`` has the one-line message."""
    seen: set[int] = set()
    found = None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(exc, UserInputError):
            found = exc
            if not isinstance(cause, UserInputError):  # not a wrapper of the same error
                return exc
        exc = cause if isinstance(cause, BaseException) else exc.__cause__
    return found
