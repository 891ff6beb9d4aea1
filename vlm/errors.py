"""Exceptions raised by the vlm package; every message says what went wrong and what to do."""

import os
import re
import tempfile


class VLMError(Exception):
    """Base class of every error the library raises on purpose."""


class ModelNotFoundError(VLMError):
    """The model argument is neither a local checkpoint directory nor a reachable hub repo."""


class HubUnreachableError(ModelNotFoundError):
    """The hub could not be reached (offline or network failure)."""


class UnsupportedModelError(VLMError):
    """config.json names a family this package does not implement."""


class CheckpointError(VLMError):
    """A checkpoint is incomplete or corrupt (config, weights, tokenizer)."""


class MissingTensorError(CheckpointError):
    """The weights lack tensors the model needs."""


class UnexpectedTensorError(CheckpointError):
    """The weights hold tensors the model does not know."""


class MediaError(VLMError):
    """An image or video cannot be used."""


class EmptyFileError(MediaError):
    """A media file has zero bytes."""


class ImageDecodeError(MediaError):
    """An image cannot be decoded (unknown format, truncated, too large)."""


class VideoDecodeError(MediaError):
    """A video cannot be decoded (no video stream, corrupt, too long)."""


class DamagedVideoError(VideoDecodeError):
    """A video decodes up to some frame and no further: its first `decodable` frames can be used
    (inside `vlm.media.partial_videos()` they are)."""

    def __init__(self, message: str, path: str = "", decodable: int = 0, cause: str = ""):
        super().__init__(message)
        self.path, self.decodable, self.cause = path, decodable, cause


class InputError(VLMError):
    """A conversation, label list or setting is malformed."""


class ContextLengthError(InputError):
    """The prompt does not fit the model's context window."""


class Cancelled(VLMError):
    """The request was cancelled (Stop, Clear, a closed tab or the time cap) while it was being worked on."""


class MemoryAdmissionError(VLMError):
    """A request would need more memory than the server has left; it is refused before it runs."""


class GenerationError(VLMError):
    """Generation failed inside the model (wraps the original exception)."""


class OutOfMemoryError(GenerationError):
    """The device ran out of memory while answering; the memory is freed and the next request can run."""


class RemoteError(VLMError):
    """A remote OpenAI-compatible server (vlm.remote) failed, could not be reached or went away."""


class ServerBusyError(RemoteError):
    """A remote server refused the request for now (429 or 503): it is busy."""


_DIRECTORIES = re.compile(r"(?<![\w:/.~])/(?:[^/\s'\"]+/)+")  # /a/b/ before a file name


def error_text(exc: BaseException) -> str:
    """The message shown to a user (chat, API), with server directories left out of file paths (whatever
    the file name starts with: a space, a quote)."""
    text = str(exc) if isinstance(exc, VLMError) else f"{type(exc).__name__}: {exc}"
    for directory in server_directories():  # with the directories under them, whatever their names hold
        text = re.sub(re.escape(directory) + r"/(?:[^/\n]*/)*", "", text)
    return _DIRECTORIES.sub("", text)


def server_directories() -> list[str]:
    """Directories of this server that may appear in messages (deepest first): Gradio's uploads, the
    working directory, the temporary directory, the home directory."""
    from gradio.utils import get_upload_folder

    found = {os.path.realpath(d) for d in (get_upload_folder(), os.getcwd(), tempfile.gettempdir(),
                                           os.path.expanduser("~"))}
    found |= {os.path.abspath(d) for d in (get_upload_folder(), tempfile.gettempdir())}
    return sorted((d for d in found if d != os.sep), key=len, reverse=True)
