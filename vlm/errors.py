"""Exceptions raised by the vlm package; every message says what went wrong and what to do."""


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


class InputError(VLMError):
    """A conversation, label list or setting is malformed."""


class ContextLengthError(InputError):
    """The prompt does not fit the model's context window."""


class KVBudgetError(ContextLengthError):
    """A prompt and its answer need more KV cache memory than the engine may use."""


class GenerationError(VLMError):
    """Generation failed inside the model (wraps the original exception)."""


class OutOfMemoryError(GenerationError):
    """The device ran out of memory while answering; the memory is freed and the next request can run."""
