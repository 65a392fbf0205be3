"""The error every pool operation raises when it refuses or fails."""

from __future__ import annotations


class AttachError(Exception):
    """The operation failed or was refused; the pool is as it was. `status` is the HTTP
    status the control API answers with."""

    def __init__(self, msg: str, status: int = 400):
        super().__init__(msg)
        self.status = status
