"""The error class of the training side: every failure of a run is one, and the CLI prints it as one line."""


class TrainingError(RuntimeError):
    """A run that had to stop (e.g. diverged), or could not start (a rerun refused: resume.ResumeError;
    no checkpoint to resume from: checkpoint.CheckpointError); the message says what is intact."""
