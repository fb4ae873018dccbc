"""Per-user preferences (backend interpreter, work folder, known models).

Inside Slicer they live in the application's QSettings under "LTUDASegmentation/<key>"; tests and
scripts outside Slicer use a JSON file with the same keys. Values are plain strings/numbers/lists
(lists are stored as JSON text in QSettings, which cannot tell a one-element list from a string).
"""

import json
import os

PREFIX = "LTUDASegmentation/"


class MemorySettings:
    def __init__(self, values=None):
        self.values = dict(values or {})

    def value(self, key, default=None):
        return self.values.get(key, default)

    def setValue(self, key, value):
        self.values[key] = value
        self._save()

    def remove(self, key):
        self.values.pop(key, None)
        self._save()

    def _save(self):
        pass


class JsonSettings(MemorySettings):
    """Settings kept in a JSON file (written on every change)."""

    def __init__(self, path):
        self.path = str(path)
        values = {}
        if os.path.isfile(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    values = json.load(f)
            except (OSError, ValueError):
                values = {}
        super().__init__(values if isinstance(values, dict) else {})

    def _save(self):
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.values, f, indent=2)
        os.replace(tmp, self.path)


class QtSettings:
    """Slicer's application settings (qt.QSettings); only usable inside Slicer."""

    def __init__(self):
        import qt

        self._settings = qt.QSettings()

    def value(self, key, default=None):
        raw = self._settings.value(PREFIX + key)
        if raw is None or raw == "":
            return default
        if isinstance(default, (list, dict)):
            try:
                return json.loads(raw)
            except (TypeError, ValueError):
                return default
        if isinstance(default, bool):
            return str(raw).lower() in ("1", "true", "yes")
        return raw

    def setValue(self, key, value):
        if isinstance(value, (list, dict)):
            value = json.dumps(value)
        self._settings.setValue(PREFIX + key, value)

    def remove(self, key):
        self._settings.remove(PREFIX + key)
