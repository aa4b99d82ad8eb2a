"""The report's one expected failure: a RUN (or an option's file) it cannot build from."""


class ReportError(RuntimeError):
    """Bad input to `clipft report`; the CLI prints it as one line."""
