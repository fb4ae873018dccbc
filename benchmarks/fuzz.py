"""Fuzzing of every input `ltuda` parses (issue 14): NIfTI, NRRD, MHA, DICOM folders, .seg.nrrd, dataset.json,
model.json and the command line's arguments.

    OMP_NUM_THREADS=1 python benchmarks/fuzz.py --model MODEL_DIR [--inputs 500] [--seed 0] [--work DIR] [--json OUT]

Valid seed files are mutated (byte flips in headers, truncation, absurd sizes and spacings, wrong types,
deep JSON, huge strings, non-UTF-8 paths) and each mutation runs through the real command (`predict`,
`evaluate`, `dataset check`, `train --dry-run`, `phantoms`), i.e. `ltuda.cli.main(argv)`, in a long-lived
worker process that imports PyTorch once (a fresh interpreter per input would cost seconds each). A
worker that dies counts as a crash, one that does not answer within the timeout as a hang (it is
replaced either way). Every input must end in a clear error (exit 1 or argparse's usage exit 2, an
`error:` line, no traceback, not our "unexpected" internal-fault message) or a correct result (exit 0
and an output that checks out), and must leave its input files unchanged.
"""

import argparse
import gzip
import hashlib
import json
import os
import random
import resource
import select
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HANG_SECONDS = 60
NASTY_NUMBERS = ["0", "-1", "-7", "2147483647", "4294967297", "99999999999999999999", "1e308", "-1e308", "nan",
                 "inf", "-inf", "1e-320", "0.0", "3.5", "0x10", "", " ", "abc", "1 2", "1,2,3", "\u00e9", "\x00"]
NASTY_STRINGS = ["", " ", "x" * 100000, "../../../../etc/passwd", "/", "\x00", "\u2603" * 10, "nan", "-1", "{}", "[]",
                 "a|b|c", "Segment0_ID", "\\\\", "%s%s%n", "'; rm -rf /", "\udcff\udcfe"]


# ----- the worker: one interpreter, many inputs -----

def worker_main():
    """Read {"argv", "cwd"} lines on stdin; answer {"code", "out", "err"} lines on the original stdout."""
    import contextlib
    import io
    import traceback

    import torch  # noqa: F401  (imported once here, as `ltuda predict` would)
    from ltuda.cli import main

    answer = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # C++ libraries' own printing must not corrupt the answers
    for line in sys.stdin:
        job = json.loads(line)
        os.chdir(job["cwd"])
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(job["argv"])
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # noqa: B902  escaped main(): the very thing we look for
                traceback.print_exc()
                code = "exception"
        def clip(text):
            return text if len(text) <= 4000 else text[:2000] + "\n[...]\n" + text[-2000:]

        answer.write(json.dumps({"code": code, "out": clip(out.getvalue()), "err": clip(err.getvalue())}) + "\n")
        answer.flush()


def _limit_memory():
    # A header promising 100 GB must be refused by us, not take the machine: cap the worker's address space.
    resource.setrlimit(resource.RLIMIT_AS, (12 * 2**30, 12 * 2**30))
    os.nice(5)


class Worker:
    def __init__(self, log_path):
        self.proc, self.log_path, self.starts = None, log_path, 0

    def _start(self):
        self.starts += 1
        with open(self.log_path, "ab") as log:  # C++ libraries' messages, and what a dying worker said
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                         text=True, preexec_fn=_limit_memory)

    def run(self, argv, cwd, timeout=HANG_SECONDS) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        try:
            self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd)}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else None
        if line:
            return json.loads(line)
        if not ready:
            self.close()
            return {"hang": True}
        code = self.proc.wait()
        self.proc = None
        return {"crash": code}

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


# ----- seed files -----

def _ct(shape=(6, 18, 20), seed=0):
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    body = ((y - shape[1] / 2) / (shape[1] * 0.4)) ** 2 + ((x - shape[2] / 2) / (shape[2] * 0.4)) ** 2 < 1
    volume = np.where(body, 40, -1000) + rng.normal(0, 20, shape)
    image = sitk.GetImageFromArray(np.broadcast_to(volume, shape).astype(np.int16))
    image.SetSpacing((1.5, 1.4, 3.0))
    image.SetOrigin((-10.0, 5.0, 20.0))
    return image


def write_dicom_series(image, folder):
    """One CT DICOM file per slice, with the tags a series reader needs to rebuild the 3D geometry."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    tags = [("0008|0060", "CT"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1.1"),
            ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.2"),
            ("0020|0037", "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))),
            ("0018|0050", f"{image.GetSpacing()[2]:.6f}")]
    for k in range(image.GetSize()[2]):
        slice_k = image[:, :, k]
        for tag, value in tags:
            slice_k.SetMetaData(tag, value)
        slice_k.SetMetaData("0008|0018", f"1.2.826.0.1.3680043.2.1125.1.3.{k + 1}")
        slice_k.SetMetaData("0020|0013", str(k + 1))
        slice_k.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_k)
    return folder


def make_seeds(work: Path, model_dir: Path) -> dict:
    """Valid inputs of every kind, and a valid dataset around them."""
    from ltuda.io.segnrrd import write_seg_nrrd
    from ltuda.model.store import read_model_json

    seeds = work / "seeds"
    shutil.rmtree(seeds, ignore_errors=True)
    seeds.mkdir(parents=True)
    image = _ct()
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        sitk.WriteImage(image, str(seeds / f"ct{suffix}"), useCompression=suffix != ".nii")
    sitk.WriteImage(image, str(seeds / "ct_gz.nrrd"), useCompression=True)
    write_dicom_series(image, seeds / "dicom")
    classes = read_model_json(model_dir)["classes"]
    labels = np.zeros(image.GetSize()[::-1], dtype=np.uint8)
    labels[1:4, 5:12, 4:9] = classes[0]["value"]
    labels[2:5, 6:10, 11:16] = classes[1]["value"]
    write_seg_nrrd(seeds / "truth.seg.nrrd", labels, image, classes)
    label_map = sitk.GetImageFromArray(labels)
    label_map.CopyInformation(image)
    sitk.WriteImage(label_map, str(seeds / "labels.nrrd"), useCompression=True)
    manifest = {"schema": "ltuda-dataset", "version": 1, "name": "fuzz", "classes": classes[:2],
                "cases": [{"id": f"c{i}", "image": "ct.nrrd", "label": "labels.nrrd", "split": "train",
                           "labeled": [classes[0]["name"], classes[1]["name"]],
                           "labels": {str(classes[0]["value"]): classes[0]["name"],
                                      str(classes[1]["value"]): classes[1]["name"]}} for i in range(2)]}
    (seeds / "dataset.json").write_text(json.dumps(manifest, indent=2))
    return {"image": image, "classes": classes, "seeds": seeds, "model": model_dir}


# ----- mutations -----

def _flip(data: bytes, rng, start, end, count) -> bytes:
    data = bytearray(data)
    end = max(start + 1, min(end, len(data)))
    for _ in range(count):
        data[rng.randrange(start, end)] ^= 1 << rng.randrange(8)
    return bytes(data)


def _text_header_end(data: bytes, kind: str) -> int:
    if kind == "nrrd":
        end = data.find(b"\n\n")
    else:  # mha: up to the ElementDataFile line
        end = data.find(b"ElementDataFile")
        end = data.find(b"\n", end) if end >= 0 else -1
    return end if end > 0 else min(len(data), 400)


def mutate_text_header(data: bytes, rng, kind: str) -> bytes:
    end = _text_header_end(data, kind)
    lines = data[:end].split(b"\n")
    choice = rng.random()
    i = rng.randrange(1, len(lines)) if len(lines) > 1 else 0
    key, sep, _ = lines[i].partition(b":" if kind == "nrrd" else b"=")
    if choice < 0.45 and sep:  # one field's value made absurd
        if kind == "nrrd" and key.strip() in (b"sizes", b"space directions", b"space origin", b"spacings"):
            parts = [rng.choice(NASTY_NUMBERS) for _ in range(rng.choice((1, 3, 3, 3, 4)))]
            value = " ".join(f"({p},{p},{p})" if b"direction" in key or b"origin" in key else p for p in parts)
        elif rng.random() < 0.7:
            value = " ".join(rng.choice(NASTY_NUMBERS) for _ in range(rng.choice((1, 3, 3))))
        else:
            value = rng.choice(NASTY_STRINGS[:13] + ["float", "block", "double", "bzip2", "big", "MET_LONG_LONG",
                                                     "MET_FLOAT_ARRAY", "7", "1"])
        lines[i] = key + sep + b" " + value.encode("utf-8", "surrogateescape")
    elif choice < 0.6:  # a field dropped or duplicated
        if rng.random() < 0.5:
            del lines[i]
        else:
            lines.insert(i, lines[i])
    elif choice < 0.75:  # huge field
        lines.insert(i, (b"x-junk:" if kind == "nrrd" else b"Junk = ") + b"y" * rng.choice((1000, 100000, 2000000)))
    else:  # byte flips in the header text
        return _flip(data, rng, 0, end, rng.randint(1, 6))
    return b"\n".join(lines) + data[end:]


NIFTI_FIELDS = [  # (offset, struct format, absurd values)
    (40, "<h", [0, -1, 1, 2, 4, 7, 8, 32767]),  # dim[0]
    (42, "<h", [0, -1, 1, 32767, -32768]), (44, "<h", [0, -3, 32767]), (46, "<h", [0, -2, 32767, 1]),
    (70, "<h", [0, 1, 2, 3, 16, 32, 64, 128, 255, 511, 768, 1024, 1536, 2048, 2304, 999]),  # datatype
    (72, "<h", [0, 1, 7, 13, 64, -16]),  # bitpix
    (80, "<f", [0.0, -1.0, float("nan"), float("inf"), 1e38, 1e-40]),  # pixdim[1]
    (84, "<f", [0.0, float("nan"), -0.0]), (88, "<f", [0.0, float("-inf"), 3e38]),
    (108, "<f", [0.0, -352.0, 1e9, float("nan"), 3.0, 348.5]),  # vox_offset
    (112, "<f", [float("nan"), 0.0, float("inf"), -1e30]),  # scl_slope
    (116, "<f", [float("nan"), float("inf")]),  # scl_inter
    (252, "<h", [0, -1, 5, 99]), (254, "<h", [0, -1, 5, 99]),  # qform_code, sform_code
    (256, "<f", [float("nan"), 2.0, -5.0]), (260, "<f", [float("inf"), 1.0]),  # quatern_b, c
    (280, "<f", [float("nan"), 0.0, 1e38]), (296, "<f", [0.0, float("nan")]),  # srow_x, srow_y
    (0, "<i", [0, -348, 540, 1 << 30]),  # sizeof_hdr
]


def mutate_nifti(data: bytes, rng) -> bytes:
    data = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3))):
        offset, fmt, values = rng.choice(NIFTI_FIELDS)
        struct.pack_into(fmt, data, offset, rng.choice(values))
    return bytes(data)


def mutate_volume_file(path: Path, rng) -> str:
    """Damage a volume file in place; returns what was done."""
    name = path.name.lower()
    data = path.read_bytes()
    gz = name.endswith(".gz")
    raw = gzip.decompress(data) if gz else data
    choice = rng.random()
    if choice < 0.2:
        cut = rng.randrange(0, len(data))
        path.write_bytes(data[:cut])
        return f"truncated to {cut} bytes"
    if gz and choice < 0.3:
        path.write_bytes(_flip(data, rng, 10, len(data), rng.randint(1, 8)))
        return "flipped bytes in the gzip stream"
    if name.endswith((".nii", ".nii.gz")):
        if choice < 0.75:
            raw, what = mutate_nifti(raw, rng), "absurd NIfTI header fields"
        else:
            raw, what = _flip(raw, rng, 0, 352, rng.randint(1, 10)), "flipped bytes in the NIfTI header"
    elif name.endswith((".nrrd", ".mha")):
        raw, what = mutate_text_header(raw, rng, "nrrd" if name.endswith(".nrrd") else "mha"), "header edit"
    else:
        raw, what = _flip(raw, rng, 0, len(raw), rng.randint(1, 20)), "flipped bytes"
    path.write_bytes(gzip.compress(raw, compresslevel=1) if gz else raw)
    return what


def mutate_dicom_folder(folder: Path, rng) -> str:
    files = sorted(folder.glob("*.dcm"))
    victim = rng.choice(files)
    data = victim.read_bytes()
    choice = rng.random()
    if choice < 0.2:
        victim.write_bytes(data[:rng.randrange(0, len(data))])
        return f"truncated {victim.name}"
    if choice < 0.45:
        victim.write_bytes(_flip(data, rng, 128, min(len(data), 1200), rng.randint(1, 8)))
        return f"flipped header bytes of {victim.name}"
    if choice < 0.7:  # a geometry tag's text value replaced by garbage of the same length
        for needle in (b"0.000000\\0.000000", b"1.000000\\0.000000", b"3.000000", b"1.500000", b"CT", b"1.2.826"):
            at = data.find(needle)
            if at >= 0 and rng.random() < 0.6:
                junk = rng.choice([b"nan", b"inf", b"-1e999", b"\xff\xfe", b"\\\\\\", b"999999999999", b"-0"])
                data = data[:at] + (junk * len(needle))[:len(needle)] + data[at + len(needle):]
                victim.write_bytes(data)
                return f"garbage in a tag of {victim.name}"
        victim.write_bytes(_flip(data, rng, 128, len(data), 3))
        return f"flipped bytes of {victim.name}"
    if choice < 0.8:
        victim.unlink()
        return f"deleted {victim.name}"
    if choice < 0.9:
        (folder / "zz_foreign.dcm").write_bytes(os.urandom(rng.randrange(0, 4000)))
        return "a foreign file in the series folder"
    from ltuda.io.volumes import itk_path

    with itk_path(victim) as safe:
        other = sitk.ReadImage(safe)
    bigger = sitk.Image([other.GetSize()[0] + 3, other.GetSize()[1], 1], other.GetPixelID())
    for key in other.GetMetaDataKeys():
        bigger.SetMetaData(key, other.GetMetaData(key))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    with itk_path(victim) as safe:
        writer.SetFileName(safe)
        writer.Execute(bigger)
    return f"{victim.name} has another slice size"


def _deep(depth):
    return "[" * depth + "]" * depth


def _paths(doc, prefix=()):
    """Every (path of keys/indices) in a JSON document."""
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _paths(value, prefix + (i,))


def _nasty_value(rng):
    return rng.choice([None, True, 0, -1, 1.5, 1e308, -2**63, 2**70, "", "x" * 1000000, [], {}, [1, 2], {"a": None},
                       "nan", "../../x", "\u0000", [[[[]]]], "255", 256, "\udcff"])


def mutate_json(text: str, rng) -> bytes:
    choice = rng.random()
    if choice < 0.08:
        return _deep(rng.choice((1000, 100000))).encode()
    if choice < 0.14:
        return text.encode()[:rng.randrange(0, len(text))]
    if choice < 0.18:
        return text.encode().replace(b'"', b'"\xff\xfe', 1)  # not UTF-8
    if choice < 0.22:
        return rng.choice([b"", b"null", b"[]", b"42", b'"x"', b"NaN", b"{}", b'{"version": Infinity}'])
    doc, deep = json.loads(text), None
    for _ in range(rng.choice((1, 1, 2, 3))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = rng.choice(paths)
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        r = rng.random()
        if r < 0.6:
            parent[path[-1]] = _nasty_value(rng)
        elif r < 0.75:
            del parent[path[-1]]
        elif r < 0.9 and isinstance(parent, list):
            parent.extend([parent[path[-1]]] * rng.choice((1, 300)))
        else:  # nesting too deep to build as Python objects: spliced in as text
            parent[path[-1]], deep = "__DEEP__", _deep(rng.choice((50, 5000)))
    text = json.dumps(doc, allow_nan=True)
    if deep:
        text = text.replace('"__DEEP__"', deep)
    return text.encode("utf-8", "surrogateescape")


# ----- the cases -----

class Case:
    def __init__(self, kind, what, argv, cwd, check=None, inputs=()):
        self.kind, self.what, self.argv, self.cwd, self.check, self.inputs = kind, what, argv, cwd, check, list(inputs)


def _odd_name(rng, stem, suffix):
    """A file name, sometimes with bytes that are not UTF-8 (Linux allows them) or odd characters."""
    r = rng.random()
    if r < 0.15:
        return os.fsdecode(stem.encode() + bytes([rng.choice((0xff, 0xfe, 0xc3, 0x80))]) + suffix.encode())
    if r < 0.2:
        return f"{stem} with spaces \u00e9{suffix}"
    return stem + suffix


def _geometry_check(output: Path, source: Path):
    def check():
        from ltuda.io.volumes import read_image, read_segmentation

        labels, _ = read_segmentation(output)
        image = read_image(source)
        return labels.GetSize() == image.GetSize()
    return check


def build_case(index: int, rng, env: dict, work: Path) -> Case:
    folder = work / "cases" / f"{index:04d}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    seeds, model = env["seeds"], env["model"]
    kinds = ["nii.gz", "nii", "nrrd", "nrrd-gz", "mha", "dicom", "seg.nrrd", "dataset.json", "model.json", "cli"]
    weights = [10, 8, 12, 6, 10, 10, 12, 12, 8, 12]
    kind = rng.choices(kinds, weights)[0]
    out = folder / "out.seg.nrrd"
    base = ["--progress", "none"]

    def predict_case(source, what):
        return Case(kind, what, ["predict", "--model", str(model), "--input", str(source), "--output", str(out),
                                 "--device", "cpu", *base], folder, _geometry_check(out, source), [source])

    if kind in ("nii.gz", "nii", "nrrd", "nrrd-gz", "mha"):
        seed = seeds / {"nrrd-gz": "ct_gz.nrrd"}.get(kind, f"ct.{kind}")
        suffix = ".nrrd" if kind == "nrrd-gz" else f".{kind}"
        source = folder / _odd_name(rng, "ct", suffix)
        shutil.copyfile(seed, source)
        return predict_case(source, mutate_volume_file(source, rng))
    if kind == "dicom":
        source = folder / _odd_name(rng, "series", "")
        shutil.copytree(seeds / "dicom", source)
        return predict_case(source, mutate_dicom_folder(source, rng))
    if kind == "seg.nrrd":
        target = folder / _odd_name(rng, "mutated", ".seg.nrrd")
        shutil.copyfile(seeds / "truth.seg.nrrd", target)
        what = mutate_volume_file(target, rng)
        if rng.random() < 0.5:  # as the ground truth of an evaluation, or as a case's label in a dataset
            argv = ["evaluate", "--pred", str(seeds / "truth.seg.nrrd"), "--truth", str(target), "--model", str(model)]
        else:
            manifest = json.loads((seeds / "dataset.json").read_text())
            for case in manifest["cases"]:
                case["image"], case["label"] = str(seeds / "ct.nrrd"), target.name
                case.pop("labels")
            (folder / "dataset.json").write_text(json.dumps(manifest))
            argv = ["dataset", "check", str(folder / "dataset.json"), "--allow-outside-paths"]
        return Case(kind, what, argv, folder, None, [target])
    if kind == "dataset.json":
        for name in ("ct.nrrd", "labels.nrrd"):
            shutil.copyfile(seeds / name, folder / name)
        (folder / "dataset.json").write_bytes(mutate_json((seeds / "dataset.json").read_text(), rng))
        if rng.random() < 0.5:
            argv = ["dataset", "check", str(folder / "dataset.json")]
        else:
            argv = ["train", "--dataset", str(folder / "dataset.json"), "--out", str(folder / "model"), "--dry-run",
                    "--preset", "fast", *base]
        return Case(kind, "mutated manifest", argv, folder, None, [folder / "dataset.json"])
    if kind == "model.json":
        shutil.copytree(model, folder / "model", ignore=shutil.ignore_patterns("checkpoints", "*.jsonl", "*.log"))
        (folder / "model" / "model.json").write_bytes(mutate_json((model / "model.json").read_text(), rng))
        argv = ["predict", "--model", str(folder / "model"), "--input", str(seeds / "ct.nrrd"), "--output", str(out),
                "--device", "cpu", *base]
        return Case(kind, "mutated model.json", argv, folder, _geometry_check(out, seeds / "ct.nrrd"),
                    [folder / "model" / "model.json"])
    return cli_case(rng, env, folder)


def cli_case(rng, env, folder: Path) -> Case:
    seeds, model = env["seeds"], env["model"]

    def value():
        return rng.choice(NASTY_NUMBERS + NASTY_STRINGS + [str(seeds / "ct.nrrd"), str(model), str(folder / "o"),
                                                        os.fsdecode(b"/tmp/\xff\xfe"), "1/0", "0/0", "3/2", "-1/4"])
    commands = {
        "predict": (["--model", str(model), "--input", str(seeds / "ct.nrrd"), "--output", str(folder / "o.seg.nrrd"),
                     "--device", "cpu"],
                    ["--model", "--input", "--output", "--head", "--label-map", "--batch-size", "--shard",
                     "--claim-timeout", "--device", "--no-postprocess", "--overwrite", "--redo"]),
        "evaluate": (["--pred", str(seeds / "truth.seg.nrrd"), "--truth", str(seeds / "truth.seg.nrrd")],
                     ["--pred", "--truth", "--model", "--dataset", "--truth-labels", "--out"]),
        "phantoms": (["--out", str(folder / "ph"), "--cases-per-site", "1", "--test-cases", "0", "--size", "32"],
                     ["--out", "--cases-per-site", "--test-cases", "--size", "--seed", "--layout"]),
        "train": (["--dataset", str(seeds / "dataset.json"), "--out", str(folder / "m"), "--dry-run", "--preset", "fast"],
                  ["--epochs-stage1", "--epochs-stage2", "--iterations-per-epoch", "--batch-size", "--image-size",
                   "--lr", "--momentum", "--ema-decay", "--prototypes", "--strong-views", "--val-fraction", "--seed",
                   "--pseudo-gate", "--pseudo-dice-gate", "--gate-cases", "--dice-weight", "--cache-dir", "--method", "--network",
                   "--device"]),
        "dataset": (["check", str(seeds / "dataset.json")], []),
    }
    command = rng.choice(list(commands))
    argv, options = list(commands[command][0]), commands[command][1]
    for _ in range(rng.choice((1, 1, 2, 3))):
        if options and rng.random() < 0.85:
            flag = rng.choice(options)
            if flag in argv and rng.random() < 0.7:
                at = argv.index(flag)
                if at + 1 < len(argv) and not argv[at + 1].startswith("--"):
                    argv[at + 1] = value()
                    continue
            argv += [flag] if flag in ("--no-postprocess", "--overwrite", "--redo") else [flag, value()]
        else:
            argv.insert(rng.randrange(0, len(argv) + 1), value())
    if command == "phantoms":  # keep a real run small: the fuzz is of the values, not of our patience
        argv = ["phantoms"] + argv
    elif command == "dataset":
        argv = ["dataset"] + argv
    else:
        argv = [command] + argv
    if command == "train" and "--dry-run" not in argv:
        argv.append("--dry-run")
    return Case("cli", " ".join(a[:40] for a in argv[1:]), argv, folder, None, [])


def _fingerprint(paths):
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for f in files:
            if f.is_file():
                digest.update(os.fsencode(str(f)) + f.read_bytes())
    return digest.hexdigest()


def classify(answer: dict, case: Case) -> str:
    if answer.get("hang"):
        return "hangs"
    if "crash" in answer:
        return "crashes"
    text = answer["err"] + answer["out"]
    if answer["code"] == "exception" or "Traceback" in text or "error: unexpected " in text:
        return "tracebacks"
    if answer["code"] == 0:
        if case.check is None:
            return "correct"
        try:
            return "correct" if case.check() else "wrong_results"
        except Exception:  # noqa: BLE001  an output that does not read back
            return "wrong_results"
    lines = [line for line in answer["err"].splitlines() if line.strip()]
    message = next((line for line in lines if line.startswith(("error: ", "ltuda: error: ")) or ": error: " in line), "")
    if answer["code"] in (1, 2) and len(message) > 12:
        return "clear_errors"
    return "unclear"


def run_fuzz(model_dir, inputs=500, seed=0, work=None, log=None) -> dict:
    work = Path(work or "/tmp/ltuda-fuzz")
    work.mkdir(parents=True, exist_ok=True)
    env = make_seeds(work, Path(model_dir))
    rng = random.Random(seed)
    worker = Worker(work / "worker-stderr.log")
    counts = {"inputs": 0, "clear_errors": 0, "correct": 0, "tracebacks": 0, "crashes": 0, "hangs": 0,
              "unclear": 0, "wrong_results": 0, "inputs_modified": 0}
    per_kind, failures = {}, []
    started = time.time()
    try:
        for index in range(inputs):
            case = build_case(index, rng, env, work)
            before = _fingerprint(case.inputs)
            case_started = time.time()
            answer = worker.run(case.argv, case.cwd)
            answer["seconds"] = round(time.time() - case_started, 2)
            outcome = classify(answer, case)
            counts["inputs"] += 1
            counts[outcome] += 1
            kind = per_kind.setdefault(case.kind, {"inputs": 0, "clear_errors": 0, "correct": 0, "failures": 0})
            kind["inputs"] += 1
            kind[outcome if outcome in ("clear_errors", "correct") else "failures"] += 1
            if _fingerprint(case.inputs) != before:
                counts["inputs_modified"] += 1
                outcome = "inputs_modified"
            if outcome not in ("clear_errors", "correct"):
                failures.append({"index": index, "kind": case.kind, "what": case.what, "outcome": outcome,
                                 "argv": [a[:200] for a in case.argv], "answer": {k: (v[-1500:] if isinstance(v, str)
                                                                                       else v) for k, v in answer.items()}})
                if log:
                    log(f"fuzz #{index} {case.kind} ({case.what}): {outcome}: "
                        f"{(answer.get('err') or str(answer)).strip().splitlines()[-1:] if answer else ''}")
            else:
                shutil.rmtree(case.cwd, ignore_errors=True)
    finally:
        worker.close()
    counts["seconds"] = round(time.time() - started, 1)
    counts["worker_starts"] = worker.starts
    return {"counts": counts, "per_kind": per_kind, "failures": failures}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help="a trained model folder (a tiny one is enough)")
    parser.add_argument("--inputs", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None)
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args()
    if args.worker:
        return worker_main()
    result = run_fuzz(args.model, args.inputs, args.seed, args.work, log=lambda m: print(m, file=sys.stderr, flush=True))
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(json.dumps(result["counts"]))
    bad = sum(result["counts"][k] for k in ("tracebacks", "crashes", "hangs", "unclear", "wrong_results",
                                            "inputs_modified"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
