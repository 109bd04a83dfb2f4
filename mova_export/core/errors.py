"""One exception family. Every message names the thing at fault (component, key, file) and the fix.

The CLI prints `error: <message>` on one line and exits with code 2 for any MoVAExportError;
anything else is a bug and keeps its traceback.
"""


class MoVAExportError(Exception):
    """Base class: a user-facing problem with a one-line message that says what to do."""


class CheckpointError(MoVAExportError):
    """The checkpoint directory, its index, a shard or a key is missing, truncated or mis-shaped."""


class ConfigError(MoVAExportError):
    """config.json or an override has a bad or missing value."""


class ComponentError(MoVAExportError):
    """An unknown component name, or a component that cannot be built from the config."""


class ExportError(MoVAExportError):
    """An ONNX export failed or missed its parity threshold."""


class BundleError(MoVAExportError):
    """A bundle is missing, incomplete, tampered with, or built for another target."""


class SignatureError(BundleError):
    """A bundle is unsigned, signed by another key, or changed after signing; or a signing key cannot be used."""


class RecipeError(MoVAExportError):
    """A recipe YAML has an unknown, missing or invalid field."""


class LLMError(MoVAExportError):
    """GGUF conversion or the llama.cpp runner failed (missing file, bad width, prompt too long)."""


class RuntimeInputError(MoVAExportError):
    """A bad frame or question handed to the runtime (wrong shape or dtype, empty question)."""


class CalibrationError(MoVAExportError):
    """The calibration folder is missing, empty or its questions file does not match its images."""


class CompileError(MoVAExportError):
    """Building a TensorRT engine failed (parser errors, builder failure, wrong device)."""


class BuildError(MoVAExportError):
    """The build cannot produce a usable bundle for this target (e.g. it would not fit its memory)."""


class BagError(MoVAExportError):
    """A ROS 2 bag is missing, truncated, not a bag, or lacks the topic asked for."""


class ServeError(MoVAExportError):
    """The server could not start (address taken) or its bundle did not load."""
