"""Which Python runs the backend, with which environment, and what it has installed.

The backend (`python -m ltuda ...`) runs either in Slicer's own Python (the PythonSlicer launcher,
default) or in an external interpreter chosen once by the user (e.g. a conda env with CUDA). The
`ltuda` package shipped with the extension is put first on the child's PYTHONPATH, so the module
and the backend always speak the same contract; an external interpreter only needs torch, MONAI,
SimpleITK, numpy and pynrrd. Nothing here imports torch: versions and the GPU are read by running
probe.py in the chosen interpreter.
"""

import json
import os
import re
import shutil
import subprocess
import sys

from .errors import LTUDAError

# Minimum versions the backend needs (keep in line with LTUDATrainer/pyproject.toml).
MIN_VERSIONS = {"torch": "2.0", "monai": "1.3", "SimpleITK": "2.2", "numpy": "1.21", "pynrrd": "1.0"}
# Bundled with Slicer: never installed or replaced into Slicer's Python by this module.
SLICER_BUNDLED = ("SimpleITK", "numpy")
PIP_NAMES = {"monai": "monai", "pynrrd": "pynrrd", "SimpleITK": "SimpleITK", "numpy": "numpy"}

LIB_DIR = os.path.dirname(os.path.abspath(__file__))
MODULE_DIR = os.path.dirname(LIB_DIR)
PROBE_SCRIPT = os.path.join(LIB_DIR, "probe.py")


def findBackendPath(moduleDir=MODULE_DIR):
    """Folder that holds the `ltuda` package: $LTUDA_BACKEND_PATH, the copy installed with the
    extension (<module dir>/LTUDABackend), or the source tree (<repo>/LTUDATrainer); None if absent."""
    candidates = [os.environ.get("LTUDA_BACKEND_PATH"), os.path.join(moduleDir, "LTUDABackend"),
                  os.path.join(os.path.dirname(moduleDir), "LTUDATrainer")]
    for candidate in candidates:
        if candidate and os.path.isfile(os.path.join(candidate, "ltuda", "__init__.py")):
            return os.path.abspath(candidate)
    return None


def slicerPythonExecutable():
    """Slicer's Python launcher (PythonSlicer), or this interpreter when there is none (tests)."""
    found = shutil.which("PythonSlicer")
    if found:
        return found
    folder = os.path.dirname(sys.executable)
    for name in ("PythonSlicer.exe", "PythonSlicer"):
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    return sys.executable


def isLauncher(executable):
    return os.path.basename(executable).lower().startswith("pythonslicer")


def realInterpreter(launcher):
    """The interpreter Slicer's PythonSlicer launcher runs (python-real next to it), or None.

    The launcher (CTKAppLauncher) starts python-real as its own child and forwards no signal: a
    stop request sent to the launcher would end the launcher, not the training. Started directly,
    the backend is our own child, gets the stop request itself and reports its own exit code."""
    folder = os.path.dirname(os.path.abspath(launcher))
    names = ("python-real.exe", "python-real") if os.name == "nt" else ("python-real",)
    for name in names:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def versionTuple(text):
    numbers = re.findall(r"\d+", (text or "").split("+")[0])
    return tuple(int(n) for n in numbers[:3]) or (0,)


class Backend:
    """How to start the backend. python=None: Slicer's own Python; else the path of an external
    interpreter. startupEnvironment: callable giving the environment Slicer was started with
    (slicer.util.startupEnvironment inside Slicer), used for the launcher and external interpreters
    so that Slicer's PYTHONHOME/PYTHONPATH never leak into another Python."""

    def __init__(self, python=None, backendPath="auto", startupEnvironment=None):
        self.python = python or None
        self.backendPath = findBackendPath() if backendPath == "auto" else backendPath
        self.startupEnvironment = startupEnvironment

    @property
    def isExternal(self):
        return self.python is not None

    def executable(self):
        if self.isExternal:
            if not os.path.isfile(self.python):
                raise LTUDAError(f"The Python interpreter {self.python} does not exist. Choose another one in the "
                                 "Setup section, or switch back to Slicer's Python.")
            return self.python
        launcher = slicerPythonExecutable()
        if isLauncher(launcher):
            # python-real runs with Slicer's own environment (os.environ below): the Slicer launcher
            # set the same library paths, PYTHONHOME and PYTHONPATH that PythonSlicer would set.
            return realInterpreter(launcher) or launcher
        return launcher

    def describe(self):
        return f"external Python {self.python}" if self.isExternal else "Slicer's Python"

    def environment(self):
        executable = self.executable()
        if (self.isExternal or isLauncher(executable)) and self.startupEnvironment is not None:
            env = dict(self.startupEnvironment())
        else:
            env = dict(os.environ)
        if self.isExternal:
            for key in ("PYTHONHOME", "PYTHONNOUSERSITE"):
                env.pop(key, None)
        if self.backendPath:
            existing = env.get("PYTHONPATH", "")
            env["PYTHONPATH"] = self.backendPath + (os.pathsep + existing if existing else "")
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        return env

    def command(self, *args):
        return [self.executable(), "-m", "ltuda"] + [str(a) for a in args]

    def torchrunCommand(self, processes, *args):
        """`ltuda ARGS` as `processes` ranks on this machine under PyTorch's launcher (torchrun), run
        by the same interpreter; --standalone picks a free port, so runs never collide."""
        return [self.executable(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(int(processes)), "-m", "ltuda"] + [str(a) for a in args]

    def run(self, args, timeout=600):
        """Run a short command to completion: (return code, stdout, stderr), text decoded as UTF-8."""
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        try:
            result = subprocess.run([str(a) for a in args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=self.environment(), timeout=timeout, **kwargs)
        except subprocess.TimeoutExpired:
            raise LTUDAError(f"{self.describe()} did not answer within {timeout} s ({' '.join(map(str, args[:3]))} ...).")
        except OSError as exc:
            raise LTUDAError(f"Could not start {self.describe()} ({exc}). Choose another Python in the Setup section.")
        return (result.returncode, result.stdout.decode("utf-8", "replace"), result.stderr.decode("utf-8", "replace"))

    def probeCommand(self):
        return [self.executable(), PROBE_SCRIPT]

    def probe(self, timeout=300):
        """ProbeResult of the interpreter (runs probe.py in it; may take a while on first torch import)."""
        code, out, err = self.run(self.probeCommand(), timeout=timeout)
        return parseProbeOutput(code, out, err, self)

    def checkDataset(self, manifestPath, allowOutsidePaths=False, timeout=1800):
        """`ltuda dataset check`: (ok, text)."""
        args = ["dataset", "check", str(manifestPath)] + (["--allow-outside-paths"] if allowOutsidePaths else [])
        code, out, err = self.run(self.command(*args), timeout=timeout)
        return code == 0, (out + err).strip()


def parseProbeOutput(code, out, err, backend=None):
    """ProbeResult from probe.py's output; raises LTUDAError when the interpreter could not run it."""
    for line in reversed((out or "").splitlines()):
        if line.strip().startswith("{"):
            try:
                return ProbeResult(json.loads(line), backend)
            except ValueError:
                break
    lastLine = ((err or "").strip().splitlines() or ["no output"])[-1]
    where = backend.describe() if backend is not None else "The backend Python"
    raise LTUDAError(f"{where} could not run the package check (exit code {code}): {lastLine}. Choose another "
                     "Python in the Setup section.")


class ProbeResult:
    """What probe.py found: .packages {name: version or None}, .gpu, .python, ..."""

    def __init__(self, report, backend=None):
        self.report = report
        self.backend = backend

    @property
    def packages(self):
        return self.report.get("packages", {})

    @property
    def gpu(self):
        return self.report.get("gpu")

    def missing(self):
        """Package names that are absent or older than MIN_VERSIONS (ltuda included)."""
        out = []
        for name, minimum in MIN_VERSIONS.items():
            version = self.packages.get(name)
            if version is None or (version != "unknown" and versionTuple(version) < versionTuple(minimum)):
                out.append(name)
        if self.packages.get("ltuda") is None:
            out.append("ltuda")
        return out

    def ready(self):
        return not self.missing()

    def deviceText(self):
        gpu = self.gpu
        if gpu:
            more = f" (+{gpu['count'] - 1} more)" if gpu.get("count", 1) > 1 else ""
            return f"GPU: {gpu['name']}, {gpu['memory_gb']} GB{more}"
        if self.packages.get("torch") is None:
            return "GPU: unknown (torch is not installed)"
        return "CPU only (no CUDA GPU visible to torch): training is slow; use the 'fast' preset"

    def lines(self):
        """[(text, ok)] for the Setup section."""
        out = [(f"Python {self.report.get('python', '?')}: {self.report.get('executable', '')}", True)]
        for name in list(MIN_VERSIONS) + ["ltuda"]:
            version = self.packages.get(name)
            if version is None:
                error = self.report.get("errors", {}).get(name, "")
                hint = "" if "No module named" in error or not error else f" ({error})"
                out.append((f"{name}: not installed{hint}", False))
            elif name in MIN_VERSIONS and version != "unknown" and versionTuple(version) < versionTuple(MIN_VERSIONS[name]):
                out.append((f"{name} {version}: too old, {MIN_VERSIONS[name]} or newer is needed", False))
            else:
                out.append((f"{name} {version}", True))
        out.append((self.deviceText(), self.gpu is not None))
        return out

    def missingMessage(self):
        missing = self.missing()
        if not missing:
            return ""
        where = self.backend.describe() if self.backend else "the backend Python"
        text = f"{where} lacks {', '.join(missing)}."
        if self.backend is not None and self.backend.isExternal:
            return text + " Install them into that environment (torch with CUDA from pytorch.org, then " \
                          "pip install monai SimpleITK pynrrd), or switch to Slicer's Python."
        if missing == ["ltuda"]:
            return text + " The LTUDA extension is incomplete: reinstall it."
        return text + " Click 'Install missing packages' in the Setup section."
