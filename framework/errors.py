"""User-facing errors: the CLI prints these as one line, without a traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, paths, data). Printed as one clear line."""


class ConfigError(UserError):
    """A config key is unknown, mistyped, missing or has a bad value."""


class DataError(UserError):
    """A shard spec, shard, sample or tokenizer cannot be used."""


class SampleError(DataError):
    """One sample cannot be decoded; the stream's fault policy decides what happens."""


class SampleFiltered(Exception):
    """A sound sample that a processor leaves out by rule (a clip shorter than data.min_seconds):
    counted (``data/filtered_samples``), never a fault, whatever data.on_error says."""
