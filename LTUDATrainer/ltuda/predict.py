"""Prediction: CT volume(s) -> Slicer `.seg.nrrd` on the input's exact voxel grid.

Slices go through the network in batches, class scores are resized back to the slice's own size
before the argmax, optional largest-component clean-up runs in SimpleITK slab by slab, and the labels
are oriented back onto the input grid. Memory is the image, about three bytes per voxel and a
batch's worth of work (a 512x512x1500 CT fits in well under 4 GiB); a volume that would not fit in the
memory available is refused up front with the estimate. `run_prediction` is the one implementation behind
`ltuda predict`, the Slicer module and the Slicer CLI module.

A GPU that runs out of memory halves the slice batch and retries (down to one slice) instead of
failing. In folder mode several workers can share one input and output folder (claims.py), or each
take a fixed shard of it (`shard=(i, n)`).
"""

import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .claims import DEFAULT_TIMEOUT_S, ClaimBox
from .data.preprocess import (Preprocessing, canonical_axes, check_image_values, normalise_hu, oriented_view,
                              resize_slices, unoriented_view)
from .errors import LtudaError
from .io.segnrrd import write_label_map, write_seg_nrrd
from .io.volumes import is_dicom_folder, list_volumes, read_header, read_image, volume_stem
from .memory import check_fits
from .model.network import HEADS, class_probabilities
from .model.store import load_model
from .progress import SilentReporter
from .terminology import EXPECTED_COMPONENTS
from .train.trainer import device_name, pick_device


# torch >= 2.5 names it torch.OutOfMemoryError (torch.cuda.OutOfMemoryError is the same class); older: cuda only
OUT_OF_MEMORY = tuple({e for e in (getattr(torch, "OutOfMemoryError", None),
                                   getattr(torch.cuda, "OutOfMemoryError", None)) if e is not None})


SLAB = 64  # slices per slab in post-processing and value checks: bounds the per-voxel temporaries


def _slab_components(mask: np.ndarray) -> np.ndarray:
    """Face-connected components of a mask slab (SimpleITK's labels, numbered in raster order)."""
    image = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.view(np.uint8)))
    return sitk.GetArrayFromImage(image)


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def keep_largest_components(labels: np.ndarray, classes, slab: int = SLAB) -> np.ndarray:
    """Per organ, keep its largest connected component (the two largest for kidneys); in place.

    Slab by slab, so memory stays bounded on big volumes: components are found in each slab of
    `slab` slices, joined across slab faces (union-find), and ranked by total size, ties by the
    first voxel in raster order, exactly as SimpleITK's RelabelComponent ranks whole-volume
    components. Values that are no class become background.
    """
    depth = labels.shape[0]
    class_values = np.zeros(256, dtype=bool)
    for cls in classes:
        class_values[cls["value"]] = True
    for start in range(0, depth, slab):
        part = labels[start:start + slab]
        part[~class_values[part]] = 0
    for cls in classes:
        value, count = cls["value"], EXPECTED_COMPONENTS.get(cls["name"].lower(), 1)
        # Pass 1: components per slab; global id = offset of its slab + local label - 1 (raster order).
        sizes, offsets, joins, previous_face, total = [], [], [], None, 0
        for start in range(0, depth, slab):
            components = _slab_components(labels[start:start + slab] == value)
            n = int(components.max())
            sizes.append(np.bincount(components.ravel(), minlength=n + 1)[1:])
            if previous_face is not None:
                touching = (previous_face > 0) & (components[0] > 0)
                if touching.any():
                    pairs = np.stack([previous_face[touching].astype(np.int64) + offsets[-1] - 1,
                                      components[0][touching].astype(np.int64) + total - 1], axis=1)
                    joins.append(np.unique(pairs, axis=0))
            offsets.append(total)
            total += n
            previous_face = components[-1].copy()
        if total == 0:
            continue
        parent = np.arange(total)
        for a, b in (np.concatenate(joins) if joins else np.zeros((0, 2), dtype=np.int64)):
            ra, rb = _find(parent, int(a)), _find(parent, int(b))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)  # the root is the group's first component in raster order
        roots = parent
        while True:  # point every component at its group's root
            jumped = roots[roots]
            if np.array_equal(jumped, roots):
                break
            roots = jumped
        group_size = np.bincount(roots, weights=np.concatenate(sizes), minlength=total)
        groups = np.unique(roots)
        ranked = groups[np.lexsort((groups, -group_size[groups]))]  # biggest first, ties: first in raster order
        keep = np.zeros(total + 1, dtype=bool)  # index: global id + 1; 0 = not this organ
        keep[1:] = np.isin(roots, ranked[:count])
        keep[0] = True
        # Pass 2: the same components again (deterministic), dropping those not kept.
        for index, start in enumerate(range(0, depth, slab)):
            part = labels[start:start + slab]
            components = _slab_components(part == value).astype(np.int64)
            components[components > 0] += offsets[index]
            part[~keep[components]] = 0
    return labels


class Predictor:
    def __init__(self, model_dir, head: str = "auto", device: str = "auto", batch_size=None, report=None):
        self.report = report or SilentReporter()
        self.model_dir = Path(model_dir)
        net, self.meta = load_model(model_dir)
        self.classes = self.meta["classes"]
        self.prep = Preprocessing.from_json(self.meta["preprocessing"])
        self.head = self.meta.get("default_head", "linear") if head in (None, "", "auto") else head
        if self.head not in HEADS:
            raise LtudaError(f"unknown head '{head}'", fix=f"Choose one of: auto, {', '.join(HEADS)}.")
        self.device = pick_device(device)
        self.net = net.to(self.device)
        self.batch_size = int(batch_size) if batch_size else (64 if self.device.type == "cuda" else 16)

    def _autocast(self):
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    @torch.no_grad()
    def segment(self, image: sitk.Image, postprocess: bool = True, on_fraction=None) -> np.ndarray:
        """Class values on `image`'s own voxel grid (SimpleITK array order z, y, x).

        The canonical (LPS) volume is a view of the image's own array, read a batch of slices at a
        time, and the labels go back onto the input grid as a view too: besides the image itself,
        memory holds one byte per voxel for the labels and a batch's worth of scores.
        """
        order, flips = canonical_axes(image)
        canonical = oriented_view(sitk.GetArrayViewFromImage(image), order, flips)  # `image` owns the memory
        depth, height, width = canonical.shape
        labels = np.zeros(canonical.shape, dtype=np.uint8)
        start = 0
        while start < depth:
            chunk = np.array(canonical[start:start + self.batch_size], dtype=np.float32)
            try:
                labels[start:start + chunk.shape[0]] = self._segment_slices(chunk, height, width)
                out_of_memory = False
            except OUT_OF_MEMORY:
                if self.batch_size <= 1:
                    raise
                out_of_memory = True
            if out_of_memory:  # outside the except block: the failed pass's tensors are freed by now
                self._halve_batch()
                continue  # the same slices again, fewer at a time
            start += chunk.shape[0]
            if on_fraction:
                on_fraction(min(1.0, start / depth))
        if postprocess:
            keep_largest_components(labels, self.classes)
        return np.ascontiguousarray(unoriented_view(labels, order, flips))

    def memory_needed(self, header) -> int:
        """Bytes `ltuda predict` needs for a volume with this header (an upper estimate): the image, the
        labels and their copy on the input grid and for the writer, a batch of slices' scores at full
        size, a post-processing slab, and the process itself (PyTorch, the network)."""
        x, y, z = header.size[:3]
        slice_voxels = x * y
        batch = self.batch_size * slice_voxels * 4 * (len(self.classes) + 1) * 3
        slab = SLAB * slice_voxels * 14
        return header.nbytes + 3 * header.voxels + batch + slab + 600 * 2**20

    def _segment_slices(self, chunk: np.ndarray, height: int, width: int) -> np.ndarray:
        x = resize_slices(normalise_hu(torch.from_numpy(chunk).to(self.device), self.prep.hu_window),
                          self.prep.image_size)
        with self._autocast():
            scores = class_probabilities(self.net(x[:, None], heads=(self.head,)), self.head)
        scores = F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)
        # max().indices: several times faster than argmax() over the channel axis on CPUs
        return scores.max(dim=1).indices.to(torch.uint8).cpu().numpy()

    def _halve_batch(self):
        """Out of GPU memory: keep half the slices per forward pass from now on (this and later cases)."""
        old, self.batch_size = self.batch_size, max(1, self.batch_size // 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.report.log(f"notice: out of GPU memory with {old} slices per batch; retrying with {self.batch_size}")


def _single_output(input_path: Path, output: Path) -> Path:
    if output.is_dir() or str(output).endswith(("/", "\\")):
        return output / f"{volume_stem(input_path)}.seg.nrrd"
    if not output.name.lower().endswith(".seg.nrrd"):
        raise LtudaError("the output must end in .seg.nrrd (or be a folder)", output,
                         "Name the output like CASE.seg.nrrd; use --label-map for a plain label map.")
    return output


def _predict_one(predictor, source: Path, target: Path, label_map, postprocess, report, index, count, claim=None):
    started = time.time()

    def on_fraction(fraction):
        if claim is not None:
            claim.heartbeat()
        report.emit("progress", fraction=(index + 0.9 * fraction) / count, case=str(source), stage="segmenting")

    header = read_header(source)
    if len(header.size) == 3:  # other shapes get their own message from read_image
        check_fits(predictor.memory_needed(header), f"segmenting this {' x '.join(map(str, header.size))} volume",
                   source, "Close other programs, or run on a machine with more memory (the estimate includes "
                           "the volume, its labels and one batch of slices; a smaller --batch-size lowers it a little).")
    image = read_image(source)
    check_image_values(sitk.GetArrayViewFromImage(image), source)
    labels = predictor.segment(image, postprocess=postprocess, on_fraction=on_fraction)
    report.emit("progress", fraction=(index + 0.95) / count, case=str(source), stage="writing")
    if claim is not None:
        claim.heartbeat(force=True)
    write_seg_nrrd(target, labels, image, predictor.classes)
    if label_map is not None:
        write_label_map(label_map, labels, image)
    seconds = time.time() - started
    report.emit("case", index=index + 1, cases=count, input=str(source), output=str(target), seconds=round(seconds, 3))
    return seconds


def run_prediction(model_dir, input_path, output_path, head="auto", postprocess=True, label_map=None,
                   device="auto", batch_size=None, redo=False, overwrite=False, report=None, shard=None,
                   claim_timeout=DEFAULT_TIMEOUT_S) -> dict:
    """Segment one volume (file or DICOM folder) or a folder of volumes; see CONTRACTS.md.

    Folder mode: `shard=(i, n)` keeps the inputs whose sorted index mod n == i; each case is claimed
    (claims.py) so several workers can share the folders; a claim silent for `claim_timeout` s is stale.
    """
    report = report or SilentReporter()
    source, output = Path(input_path), Path(output_path)
    if not source.exists():
        raise LtudaError("input not found", source, "Pass a volume file, a DICOM series folder or a folder of volumes.")
    if claim_timeout is not None and not claim_timeout > 0:
        raise LtudaError(f"--claim-timeout {claim_timeout} is not a positive number of seconds",
                         fix="Use e.g. 3600 (an hour without a sign of life from the worker holding a case).")
    batch_mode = source.is_dir() and not is_dicom_folder(source)
    if shard is not None and not batch_mode:
        raise LtudaError("--shard needs a folder of volumes as --input", source,
                         "Pass the folder that holds the volumes, or leave --shard out for one volume.")
    predictor = Predictor(model_dir, head, device, batch_size, report=report)
    report.log(f"model {predictor.model_dir} ({len(predictor.classes)} organs, head {predictor.head}) "
               f"on {device_name(predictor.device)}")
    claims = None
    if batch_mode:
        inputs = list_volumes(source)
        if not inputs:
            raise LtudaError("holds no volumes (.nii.gz, .nii, .nrrd, .mha) or DICOM series", source)
        if shard is not None:
            inputs = [p for i, p in enumerate(inputs) if i % shard[1] == shard[0]]
            report.log(f"shard {shard[0]}/{shard[1]}: {len(inputs)} case(s)")
        if output.exists() and not output.is_dir():
            raise LtudaError("must be a folder when the input is a folder", output)
        output.mkdir(parents=True, exist_ok=True)
        label_dir = Path(label_map) if label_map else None
        if label_dir:
            label_dir.mkdir(parents=True, exist_ok=True)
        jobs = [(p, output / f"{volume_stem(p)}.seg.nrrd", label_dir / f"{volume_stem(p)}.nrrd" if label_dir else None)
                for p in inputs]
        claims = ClaimBox(output, claim_timeout if claim_timeout is not None else DEFAULT_TIMEOUT_S, report)
    else:
        target = _single_output(source, output)
        if target.resolve() == source.resolve():
            raise LtudaError("the output would overwrite the input", target, "Choose another output path.")
        if target.exists() and not (overwrite or redo):
            raise LtudaError("already exists", target, "Pass --overwrite to replace it, or choose another output.")
        target.parent.mkdir(parents=True, exist_ok=True)
        jobs = [(source, target, Path(label_map) if label_map else None)]
    report.emit("start", command="predict", cases=len(jobs), device=predictor.device.type,
                device_name=device_name(predictor.device), head=predictor.head)
    run_started = time.time()
    done, failed, seconds = [], [], []

    def finished_elsewhere(dst: Path) -> bool:
        """Its output exists (with --redo: was written since this run started, by another worker)."""
        try:
            return not redo or dst.stat().st_mtime >= run_started - 1
        except OSError:
            return False

    def attempt(index, src, dst, lab):
        """'done', 'skipped', 'failed' or 'busy' (another worker holds the case)."""
        if batch_mode and dst.exists() and finished_elsewhere(dst):
            report.emit("progress", fraction=(index + 1) / len(jobs), case=str(src), stage="skipped (already done)")
            return "skipped"
        claim = claims.claim(volume_stem(src)) if claims is not None else None
        if claims is not None and claim is None:
            report.emit("progress", fraction=(index + 1) / len(jobs), case=str(src),
                        stage="skipped (another worker is on it)")
            return "busy"
        try:
            if claim is not None and dst.exists() and finished_elsewhere(dst):  # finished while we claimed it
                report.emit("progress", fraction=(index + 1) / len(jobs), case=str(src), stage="skipped (already done)")
                return "skipped"
            try:
                seconds.append(_predict_one(predictor, src, dst, lab, postprocess, report, index, len(jobs), claim))
                done.append(str(dst))
                return "done"
            except LtudaError as exc:
                if not batch_mode:
                    raise
                failed.append({"input": str(src), "message": str(exc)})
                report.emit("case_failed", input=str(src), message=str(exc))
            except (RuntimeError, MemoryError) as exc:  # e.g. out of memory on one huge volume
                message = f"{src}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                if not batch_mode:
                    raise LtudaError(message, fix="Try --device cpu or a smaller --batch-size.") from None
                failed.append({"input": str(src), "message": message})
                report.emit("case_failed", input=str(src), message=message)
            return "failed"
        finally:
            if claim is not None:
                claim.release()

    outcomes = {index: attempt(index, *job) for index, job in enumerate(jobs)}
    # Once more for the cases other workers held: a worker that died meanwhile left them to us.
    for index in [i for i, outcome in outcomes.items() if outcome == "busy"]:
        outcomes[index] = attempt(index, *jobs[index])
    skipped = [str(jobs[i][0]) for i, outcome in outcomes.items() if outcome == "skipped"]
    busy = [str(jobs[i][0]) for i, outcome in outcomes.items() if outcome == "busy"]
    if claims is not None:
        claims.tidy()
    summary = {"cases": len(jobs), "done": len(done), "skipped": len(skipped), "busy": len(busy), "failed": failed,
               "outputs": done, "seconds_per_case": round(float(np.mean(seconds)), 3) if seconds else None}
    if predictor.device.type == "cuda":
        summary["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(predictor.device) / 2**30, 3)
    report.emit("done", status="completed", **summary)
    return summary
