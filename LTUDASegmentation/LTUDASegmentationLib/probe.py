"""Run by the backend interpreter (never imported by Slicer): report Python, packages and GPU as JSON.

Usage: PYTHON probe.py  ->  one JSON object on stdout. Only the standard library is needed; each
package import is guarded, so a broken install is reported instead of crashing the probe.
"""

import json
import platform
import sys

PACKAGES = [("torch", "torch"), ("monai", "monai"), ("SimpleITK", "SimpleITK"), ("numpy", "numpy"),
            ("pynrrd", "nrrd"), ("ltuda", "ltuda")]


def _version(module):
    for attribute in ("__version__", "version", "Version"):
        value = getattr(module, attribute, None)
        if callable(value):
            try:
                value = value()
            except Exception:
                value = None
        if isinstance(value, str):
            return value
    return "unknown"


def main():
    report = {"python": platform.python_version(), "executable": sys.executable, "packages": {}, "errors": {},
              "paths": {}, "gpu": None, "cuda_built": None, "mps": False}
    modules = {}
    for name, importName in PACKAGES:
        try:
            module = __import__(importName)
            modules[name] = module
            report["packages"][name] = _version(module)
            report["paths"][name] = getattr(module, "__file__", None)
        except Exception as exc:  # ImportError, or a broken binary package
            report["packages"][name] = None
            report["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    torch = modules.get("torch")
    if torch is not None:
        try:
            report["cuda_built"] = getattr(torch.version, "cuda", None)
            if torch.cuda.is_available():
                index = torch.cuda.current_device()
                props = torch.cuda.get_device_properties(index)
                report["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 1024 ** 3, 1),
                                 "count": torch.cuda.device_count()}
            mps = getattr(getattr(torch, "backends", None), "mps", None)
            report["mps"] = bool(mps is not None and mps.is_available())
        except Exception as exc:
            report["errors"]["gpu"] = f"{type(exc).__name__}: {exc}"
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
