#!/usr/bin/env python-real
"""LTUDA Batch Segment: Slicer CLI module (and plain command) segmenting CT volumes with an LTUDA model.

Slicer runs this file with its own interpreter (python-real) and the arguments described in
LTUDABatchSegment.xml: every parameter as `--name value` in the XML's order, booleans as a bare
`--name` present only when checked, input/output images as temporary .nrrd files, empty file and
string parameters left out, and a `directory` parameter that nobody chose as "." (what Qt's
directory button holds when empty). The same command line works by hand:

    PythonSlicer LTUDABatchSegment.py --modelDirectory MODEL --inputVolume ct.nrrd --outputSegmentation ct.seg.nrrd
    python LTUDABatchSegment.py --modelDirectory MODEL --inputFolder cts/ --outputFolder segs/ [--redo]

All the work is `ltuda.predict.run_prediction` (the implementation behind `ltuda predict`); this
script checks the arguments, finds the `ltuda` package, turns its progress events into the
<filter-...> lines Slicer's progress bar reads, prints a summary and sets the exit code:
0 done, 1 bad input or some cases failed (after finishing the others), 2 bad command line,
130 stopped. Needs Python 3.9+.
"""

import argparse
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

MODULE_NAME = "LTUDABatchSegment"
HEADS = ("auto", "linear", "proto-labeled", "proto-unlabeled")
DEVICES = ("auto", "cpu", "cuda")
MAX_BATCH_SIZE = 1024  # = <constraints><maximum> of batchSize in the XML
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 130

# Options that are not module parameters (not in the XML): Slicer Execution Model conventions.
META_OPTIONS = ("-h", "--help", "--xml")


class UsageError(Exception):
    """A wrong or incomplete set of parameters: one line saying what to pass."""


# ---------------------------------------------------------------------------------------------
# Command line (must declare exactly the parameters of LTUDABatchSegment.xml)

def _boolean(text):
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_flag(group, name, help_text):
    """A boolean the Slicer way: bare `--name` means true, absent means false.

    `--name true|false` is also accepted (for scripts that always pass a value); every option of
    this module is a flag, so the optional value can never swallow a positional argument.
    """
    group.add_argument(f"--{name}", dest=name, nargs="?", const=True, default=False, type=_boolean,
                       metavar="true|false", help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=MODULE_NAME,
        description="Segment CT volumes with a trained LTUDA model: one volume, or every volume of a folder.",
        epilog="Exit status: 0 done, 1 bad input or failed cases, 2 bad command line, 130 stopped.")
    parser.add_argument("--xml", action="store_true", help="print the Slicer module description (XML) and exit")

    one = parser.add_argument_group("one volume")
    one.add_argument("--inputVolume", dest="inputVolume", default=None, metavar="VOLUME",
                     help="CT volume (.nrrd, .nii.gz, .nii, .mha) or DICOM series folder")
    one.add_argument("--modelDirectory", dest="modelDirectory", default=None, metavar="MODEL_DIR",
                     help="trained model folder (model.json + model.pt); required")
    one.add_argument("--outputSegmentation", dest="outputSegmentation", default=None, metavar="OUT.seg.nrrd",
                     help="segmentation with organ names, colours and terminology (replaced if it exists)")
    one.add_argument("--outputLabelMap", dest="outputLabelMap", default=None, metavar="LABELS.nrrd",
                     help="also (or instead) a plain label map, values 1..C in the model's organ order")

    batch = parser.add_argument_group("folder of volumes")
    batch.add_argument("--inputFolder", dest="inputFolder", default=None, metavar="DIR",
                       help="segment every volume in this folder")
    batch.add_argument("--outputFolder", dest="outputFolder", default=None, metavar="DIR",
                       help="gets CASE.seg.nrrd per input")
    batch.add_argument("--outputLabelMapFolder", dest="outputLabelMapFolder", default=None, metavar="DIR",
                       help="also a label map CASE.nrrd per input")
    _add_flag(batch, "redo", "segment again inputs whose output already exists (default: skip them)")

    advanced = parser.add_argument_group("advanced")
    advanced.add_argument("--head", dest="head", choices=HEADS, default="auto", help="classifier head (default auto)")
    _add_flag(advanced, "noPostprocess", "skip the largest-connected-component clean-up")
    advanced.add_argument("--device", dest="device", choices=DEVICES, default="auto", help="default auto")
    advanced.add_argument("--batchSize", dest="batchSize", type=int, default=0, metavar="N",
                          help="slices per forward pass, 0 = automatic")
    return parser


def parameter_options(parser=None) -> set:
    """The option strings of the module parameters (for the XML parity test)."""
    parser = parser or build_parser()
    return {opt for action in parser._actions for opt in action.option_strings if opt not in META_OPTIONS}


# ---------------------------------------------------------------------------------------------
# Checking the parameters (before any heavy import, so mistakes fail in a fraction of a second)

def _given(value):
    """None for a parameter left empty. Slicer passes an unchosen directory as "." (an empty Qt
    directory button), so "." means "not set"; by hand, write ./ or the full path for this folder."""
    if value is None:
        return None
    text = str(value).strip()
    if text in ("", "."):
        return None
    return text


def plan_jobs(args):
    """[(title, input, output, label_map, is_folder)] from the parsed arguments, or UsageError."""
    model = _given(args.modelDirectory)
    volume, seg_out, label_out = _given(args.inputVolume), _given(args.outputSegmentation), _given(args.outputLabelMap)
    folder, out_folder, label_folder = _given(args.inputFolder), _given(args.outputFolder), _given(args.outputLabelMapFolder)

    if model is None:
        raise UsageError("no model folder: pass --modelDirectory MODEL_DIR (the folder with model.json "
                         "written by the LTUDA Segmentation module or `ltuda train --out`).")
    if not Path(model).is_dir():
        raise UsageError(f"{model}: model folder not found. Pass the folder that holds model.json and model.pt.")
    if args.batchSize is None or not 0 <= args.batchSize <= MAX_BATCH_SIZE:
        raise UsageError(f"--batchSize {args.batchSize}: use 0 (automatic) or a number of slices from 1 to "
                         f"{MAX_BATCH_SIZE}.")

    jobs = []
    wants_single_output = seg_out is not None or label_out is not None
    if volume is not None and (wants_single_output or folder is None):
        if not wants_single_output:
            raise UsageError("no output for the input volume: pass --outputSegmentation OUT.seg.nrrd and/or "
                             "--outputLabelMap LABELS.nrrd (or --inputFolder/--outputFolder for folder mode).")
        if seg_out is not None and not (seg_out.lower().endswith(".seg.nrrd") or Path(seg_out).is_dir()):
            raise UsageError(f"{seg_out}: the output segmentation must end in .seg.nrrd (or be a folder). "
                             "Use --outputLabelMap for a plain label map.")
        if not Path(volume).exists():
            raise UsageError(f"{volume}: input volume not found. Pass a volume file (.nrrd, .nii.gz, .nii, .mha) "
                             "or a DICOM series folder.")
        jobs.append(("volume", Path(volume), Path(seg_out) if seg_out else None,
                     Path(label_out) if label_out else None, False))
    elif volume is None and wants_single_output:
        raise UsageError("an output volume was given but no input: pass --inputVolume VOLUME.")

    if folder is not None:
        if out_folder is None:
            raise UsageError("folder mode needs an output folder: pass --outputFolder DIR "
                             "(it gets one CASE.seg.nrrd per input).")
        if not Path(folder).is_dir():
            raise UsageError(f"{folder}: input folder not found. Pass an existing folder of volumes.")
        if _same_path(folder, out_folder) or (label_folder and _same_path(folder, label_folder)):
            raise UsageError(f"{folder}: the output folders must differ from the input folder, "
                             "or the outputs would be taken for inputs next time.")
        jobs.append(("folder", Path(folder), Path(out_folder), Path(label_folder) if label_folder else None, True))
    elif out_folder is not None or label_folder is not None:
        raise UsageError("an output folder was given but no input folder: pass --inputFolder DIR.")

    if not jobs:
        raise UsageError("nothing to segment: pass --inputVolume with --outputSegmentation and/or --outputLabelMap, "
                         "or --inputFolder with --outputFolder.")
    return jobs


def _same_path(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Finding the backend

def backend_candidates(script=__file__):
    """Folders that may hold the `ltuda` package, best first (see find_backend)."""
    here = Path(script).resolve().parent
    found = []
    if os.environ.get("LTUDA_BACKEND_PATH"):
        found.append(Path(os.environ["LTUDA_BACKEND_PATH"]))
    # Installed extension / build tree: <lib/Slicer-X.Y>/cli-modules/[<config>/]LTUDABatchSegment.py and
    # <lib/Slicer-X.Y>/qt-scripted-modules/LTUDABackend/ltuda (see LTUDASegmentation/CMakeLists.txt).
    found.append(here.parent / "qt-scripted-modules" / "LTUDABackend")
    found.append(here.parent.parent / "qt-scripted-modules" / "LTUDABackend")
    found.append(here / "LTUDABackend")
    return found


def source_tree_backend(script=__file__):
    # Source tree: <repo>/LTUDASegmentation/LTUDABatchSegment/LTUDABatchSegment.py and <repo>/LTUDATrainer/ltuda
    return Path(script).resolve().parent.parent.parent / "LTUDATrainer"


def find_backend():
    """Put the right `ltuda` on sys.path and return where it was found.

    Order: $LTUDA_BACKEND_PATH, the copy installed with the extension (matches this module's
    version), an `ltuda` already importable in this Python (e.g. pip-installed), the source tree.
    """
    for folder in backend_candidates():
        if (folder / "ltuda" / "__init__.py").is_file():
            sys.path.insert(0, str(folder))
            return str(folder / "ltuda")
    try:
        import ltuda  # noqa: F401
        return str(Path(ltuda.__file__).parent)
    except ImportError:
        pass
    folder = source_tree_backend()
    if (folder / "ltuda" / "__init__.py").is_file():
        sys.path.insert(0, str(folder))
        return str(folder / "ltuda")
    raise UsageError("the LTUDA backend (Python package `ltuda`) was not found next to this module, in "
                     "$LTUDA_BACKEND_PATH or in this Python. Reinstall the LTUDA extension, or set "
                     "LTUDA_BACKEND_PATH to the folder that contains ltuda/.")


def import_backend():
    """(run_prediction, LtudaError, Reporter base class), with a fix-it message for missing packages."""
    try:
        from ltuda.errors import LtudaError
        from ltuda.predict import run_prediction
        from ltuda.progress import Reporter
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing == "ltuda":
            raise
        hint = {
            "torch": "PyTorch is missing: in Slicer install the PyTorch extension (Extensions Manager), restart, "
                     "and let it install torch; outside Slicer run `pip install torch`.",
            "monai": "MONAI is missing: open the LTUDA Segmentation module once (it offers to install it), "
                     "or run `PythonSlicer -m pip install monai`.",
            "nrrd": "pynrrd is missing: run `PythonSlicer -m pip install pynrrd` (or pip install pynrrd).",
            "SimpleITK": "SimpleITK is missing: use Slicer's Python (PythonSlicer) or `pip install SimpleITK`.",
        }.get(missing, f"Install the Python package `{missing}` in this Python ({sys.executable}).")
        raise UsageError(f"cannot load the LTUDA backend: {hint}") from None
    return run_prediction, LtudaError, Reporter


# ---------------------------------------------------------------------------------------------
# Progress as Slicer reads it

def _tag_text(text) -> str:
    """One line without '<' or '>' (Slicer reads tag contents up to the next '<')."""
    return " ".join(str(text).replace("<", "(").replace(">", ")").split())[:400]


class FilterProgress:
    """Writes Slicer Execution Model progress lines to stdout (flushed at once):
    <filter-start>, <filter-progress>F</filter-progress> (F in 0..1 for the whole run),
    <filter-comment>status</filter-comment>, <filter-end>."""

    def __init__(self, stream=None, name=MODULE_NAME):
        self.stream = stream if stream is not None else sys.stdout
        self.name = name
        self.started = time.time()
        self.last_fraction = -1.0
        self.ended = False

    def _write(self, text):
        self.stream.write(text + "\n")
        self.stream.flush()

    def start(self, comment):
        self._write(f"<filter-start><filter-name>{_tag_text(self.name)}</filter-name>"
                    f"<filter-comment>{_tag_text(comment)}</filter-comment></filter-start>")

    def progress(self, fraction, comment=None):
        fraction = min(1.0, max(0.0, float(fraction)))
        if comment is not None:
            self.comment(comment)
        # Never move backwards, and skip repeats of the same value.
        if fraction > self.last_fraction + 1e-4:
            self.last_fraction = fraction
            self._write(f"<filter-progress>{fraction:.4f}</filter-progress>")

    def comment(self, text):
        self._write(f"<filter-comment>{_tag_text(text)}</filter-comment>")

    def log(self, text):
        self._write(str(text))

    def end(self):
        if not self.ended:
            self.ended = True
            self._write(f"<filter-end><filter-name>{_tag_text(self.name)}</filter-name>"
                        f"<filter-time>{time.time() - self.started:.2f}</filter-time></filter-end>")


def make_reporter(reporter_base, progress, span_start, span_width, title):
    """A ltuda Reporter that maps one run_prediction call onto [span_start, span_start + span_width]."""

    class SlicerReporter(reporter_base):
        def __init__(self):
            super().__init__(stream=progress.stream, log_stream=progress.stream)
            self.last_status = None
            self.cases = None

        def _status(self, text):
            if text != self.last_status:
                self.last_status = text
                progress.comment(text)

        def emit(self, event, **fields):
            if event == "start":
                self.cases = fields.get("cases")
                self._status(f"{title}: {self.cases} case(s) on {fields.get('device_name') or fields.get('device')}, "
                             f"head {fields.get('head')}")
            elif event == "progress":
                case = Path(str(fields.get("case", ""))).name
                stage = fields.get("stage") or ""
                self._status(f"{case}: {stage}" if case else stage)
                progress.progress(span_start + span_width * float(fields.get("fraction") or 0.0))
            elif event == "case":
                progress.log(f"[{fields.get('index')}/{fields.get('cases')}] {fields.get('input')} -> "
                             f"{fields.get('output')} ({float(fields.get('seconds') or 0):.1f} s)")
            elif event == "case_failed":
                progress.log(f"FAILED: {_failure_text(fields)}")
            elif event == "error":
                progress.log(f"error: {backend_message(fields.get('message'))}")

        def log(self, text):
            progress.log(text)

    return SlicerReporter()


# `ltuda predict` option names in backend messages, as this module calls them.
_BACKEND_FLAGS = (("--label-map", "--outputLabelMap"), ("--batch-size", "--batchSize"),
                  ("--no-postprocess", "--noPostprocess"))


def backend_message(text) -> str:
    text = str(text or "")
    for theirs, ours in _BACKEND_FLAGS:
        text = text.replace(theirs, ours)
    return text


def _failure_text(failure) -> str:
    """A failed case's message, naming its input once."""
    message, source = backend_message(failure.get("message")), str(failure.get("input") or "")
    return message if not source or source in message else f"{source}: {message}"


# ---------------------------------------------------------------------------------------------
# Running

def _count_inputs(folder) -> int:
    try:
        from ltuda.io.volumes import list_volumes
        return max(1, len(list_volumes(folder)))
    except Exception:  # the backend reports a bad folder itself, with its own message
        return 1


def _stop(signum, frame):
    raise KeyboardInterrupt


def run(args, progress) -> int:
    jobs = plan_jobs(args)
    progress.comment("Loading the LTUDA backend")
    where = find_backend()
    run_prediction, LtudaError, Reporter = import_backend()
    progress.log(f"LTUDA backend: {where}")
    if args.inputVolume and _given(args.inputVolume) and not any(not j[4] for j in jobs):
        progress.log(f"note: --inputVolume {args.inputVolume} is not segmented in folder mode "
                     "(give --outputSegmentation or --outputLabelMap to segment it too)")

    model = _given(args.modelDirectory)
    weights = [(_count_inputs(job[1]) if job[4] else 1) for job in jobs]
    total_weight = float(sum(weights))
    started = time.time()
    summaries, failures = [], []
    span_start = 0.0
    progress.progress(0.0, "Loading the model")
    for job, weight in zip(jobs, weights):
        title, source, output, label_map, is_folder = job
        span_width = weight / total_weight
        reporter = make_reporter(Reporter, progress, span_start, span_width, title)
        kwargs = dict(head=args.head, postprocess=not args.noPostprocess, device=args.device,
                      batch_size=args.batchSize or None, report=reporter)
        try:
            if is_folder:
                summary = run_prediction(model, source, output, label_map=label_map, redo=bool(args.redo), **kwargs)
            else:
                summary = _run_single(run_prediction, model, source, output, label_map, kwargs)
        except LtudaError as exc:
            raise UsageError(backend_message(exc)) from None
        summaries.append((job, summary))
        failures.extend(summary.get("failed") or [])
        span_start += span_width
    progress.progress(1.0, "Done" if not failures else f"Done, {len(failures)} failed")
    _print_summary(progress, summaries, failures, time.time() - started)
    return EXIT_FAILED if failures else EXIT_OK


def _run_single(run_prediction, model, source, seg_out, label_map, kwargs):
    """One volume. Outputs are replaced, as every Slicer CLI output is; with only a label map
    requested, the .seg.nrrd goes to a temporary folder that is removed afterwards."""
    if seg_out is not None:
        return run_prediction(model, source, seg_out, label_map=label_map, overwrite=True, **kwargs)
    with tempfile.TemporaryDirectory(prefix="ltuda-cli-") as tmp:
        summary = run_prediction(model, source, Path(tmp) / "segmentation.seg.nrrd", label_map=label_map,
                                 overwrite=True, **kwargs)
        summary = dict(summary, outputs=[str(label_map)])
    return summary


def _print_summary(progress, summaries, failures, seconds):
    cases = sum(s.get("cases", 0) for _, s in summaries)
    done = sum(s.get("done", 0) for _, s in summaries)
    skipped = sum(s.get("skipped", 0) for _, s in summaries)
    timed = [(s["seconds_per_case"], s.get("done", 0)) for _, s in summaries
             if s.get("seconds_per_case") is not None and s.get("done")]
    per_case_text = (f"{sum(t * n for t, n in timed) / sum(n for _, n in timed):.2f} s per case"
                     if timed else "no case segmented")
    progress.log(f"Summary: {cases} case(s): {done} done, {skipped} skipped (already done), "
                 f"{len(failures)} failed; {per_case_text}; {seconds:.1f} s in all")
    for (title, source, output, label_map, is_folder), summary in summaries:
        target = output if output is not None else label_map
        progress.log(f"  {title} {source} -> {target}")
    if failures:
        lines = [f"{len(failures)} of {cases} case(s) failed (the others were written):"]
        lines += [f"  - {_failure_text(f)}" for f in failures]
        print("\n".join(lines), file=sys.stderr, flush=True)


def _xml_text() -> str:
    return Path(__file__).with_suffix(".xml").read_text(encoding="utf-8")


def main(argv=None) -> int:
    for stream in (sys.stdout, sys.stderr):
        try:  # a non-UTF-8 console must not crash on a file name
            stream.reconfigure(errors="replace")
        except (AttributeError, ValueError):
            pass
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a usage message on a bad command line
    if args.xml:
        sys.stdout.write(_xml_text())
        return EXIT_OK
    try:
        signal.signal(signal.SIGTERM, _stop)
    except (ValueError, OSError, AttributeError):  # not the main thread, or no SIGTERM here
        pass

    progress = FilterProgress()
    progress.start("Checking parameters")
    try:
        return run(args, progress)
    except UsageError as exc:
        progress.comment("Failed")
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("stopped: outputs already written are complete; run again to continue "
              "(finished cases are skipped).", file=sys.stderr, flush=True)
        return EXIT_STOPPED
    except Exception as exc:  # an internal fault: one line, details on request
        if os.environ.get("LTUDA_DEBUG"):
            traceback.print_exc()
        detail = str(exc).splitlines()[0] if str(exc) else ""
        print(f"error: unexpected {type(exc).__name__}: {detail} (set LTUDA_DEBUG=1 for details and report it)",
              file=sys.stderr, flush=True)
        return EXIT_FAILED
    finally:
        progress.end()


if __name__ == "__main__":
    sys.exit(main())
