"""Error types for user-facing problems: each message is one line naming the bad input and the fix."""


class CheckpointError(ValueError):
    """A checkpoint file or folder is missing, corrupt or of the wrong kind."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file or folder does not exist."""
