"""The exception the module shows to people: one message, the same in the panel and the console."""


class LTUDAError(Exception):
    """Bad input or a failed run, explained for a clinician: what is wrong and how to fix it.

    `details` holds optional extra text (a log path, the backend's last lines) for the panel's
    "details" box; `str(error)` is the message alone.
    """

    def __init__(self, message, details=""):
        super().__init__(message)
        self.message = message
        self.details = details
