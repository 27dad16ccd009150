"""The one error type users see: a message that names the file, the field and the fix."""

from __future__ import annotations


class PocketError(Exception):
    """A user-facing error. The CLI prints it as one message and exits with ``exit_code``
    (2 for bad input, 1 for a failure while running), with no traceback unless ``--debug``."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None, fix: str | None = None, exit_code: int = 2):
        super().__init__(message)
        self.message, self.file, self.line, self.field, self.fix = message, file, line, field, fix
        self.exit_code = exit_code

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = str(self.file) + (f":{self.line}" if self.line else "")
        if self.field:
            where = f"{where}: {self.field}" if where else self.field
        text = f"{where}: {self.message}" if where else self.message
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text


class NotStreamable(PocketError):
    """``offload = "disk"`` cannot stream this model (an architecture whose shell it cannot build,
    or a GGUF architecture it does not read); nothing of the weights was read, so loading the
    model whole may still work."""
