"""The one exception type users see: a message for a person, no traceback."""


class LtudaError(Exception):
    """Bad input or a failed run, explained: what is wrong, which file, how to fix it."""

    def __init__(self, message: str, path=None, fix: str = ""):
        self.path = None if path is None else str(path)
        self.fix = fix
        parts = [message if self.path is None else f"{self.path}: {message}"]
        if fix:
            parts.append(fix)
        super().__init__(" ".join(parts))


class ManifestProblems(LtudaError):
    """Every problem found in a dataset at once, one per line."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__(f"{len(self.problems)} problem(s) found:\n" + "\n".join(f"  - {p}" for p in self.problems))
