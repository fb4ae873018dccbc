"""Synthetic partially labelled abdominal CT: the paper's "toy set" layout, in HU.

Four training sites each label ONE organ (as LiTS, MSD spleen, KiTS and NIH pancreas do) with their own
label conventions; the other organs are in the image but background in the label. A fifth site, another
scanner, is fully labelled and is the test set. Sites differ in noise, intensity offset, slice
thickness, in-plane spacing and contrast phase; distractors (stomach, bowel, vessels, muscle,
gallbladder) overlap the organs in HU, so thresholding does not segment them.

Sites as the real data sets (layout "multi-site", since the site-gap work of issue 12): the kidney site
is KiTS19-like, late arterial only (bright cortex over darker pyramids, a 300 HU aorta, a barely
enhanced liver, a zebra spleen); spleen (MSD) and pancreas (NIH) sites are portal venous only; the
liver site (LiTS) is mostly portal venous, with slice thickness per case and large tumours; sites'
cohorts differ in body fat. So, as in the real data, an organ can be labelled in one phase only, and
labelled-only models meet a real shift on the other sites. The toy layout is unchanged by this
(byte-identical files): it takes every scanner and population field from the test site, and outside
the arterial phase the renal pyramids render exactly as the rest of the kidney.

Anatomy lives in patient millimetres: u towards the patient's left, v posterior, w superior (LPS, as
ITK's identity direction), origin at the body centre near L1. Each case samples sizes, positions,
rotations and smooth deformations; structures are painted in order, later ones over earlier ones,
into a tissue map (for HU) and a part map (for labels), so organs never overlap in a label.
"""

import math
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import LtudaError, failed_write_cause, write_error
from ..io.volumes import itk_path
from ..manifest import Case, write_manifest
from ..terminology import default_classes

# Parts: what a voxel belongs to, before a site's label conventions. 1..4 are the class values.
BG, LIVER, SPLEEN, KIDNEY, PANCREAS, LIVER_TUMOUR, KIDNEY_TUMOUR = range(7)
ORGAN_PARTS = {"liver": LIVER, "spleen": SPLEEN, "kidney": KIDNEY, "pancreas": PANCREAS}
# Fully labelled convention: class values; a liver tumour is liver, a kidney tumour is not kidney.
FULL_VALUES = {LIVER: 1, SPLEEN: 2, KIDNEY: 3, PANCREAS: 4, LIVER_TUMOUR: 1}
FULL_VALUE_MAP = {1: "liver", 2: "spleen", 3: "kidney", 4: "pancreas"}

# Tissues: name -> (native mean, native sd, portal-venous mean, portal-venous sd, arterial mean, arterial sd,
# share of sd that is fine texture). Organ values are set so the mean over the LABEL (with partial volume at the
# edges) lands on real scans: native liver 45 +- 15, spleen 33 +- 17, kidney 13 +- 23, pancreas -8 +- 28 HU.
# Arterial = the late-arterial / corticomedullary phase of KiTS19 (about 35-40 s): aorta 250-350 HU, kidney
# cortex 150-200 and medulla 60-90 (a visible cortico-medullary difference), liver only mildly enhanced 60-75
# (its supply is mostly portal), pancreas at its peak 100-130, spleen heterogeneous (see ARTERIAL_FINE_SHARE),
# unopacified vena cava and hepatic veins, a partly opacified portal vein.
TISSUES = {
    "air": (-1000, 4, -1000, 4, -1000, 4, 0.5),
    "table": (120, 25, 120, 25, 120, 25, 0.5),
    "subcutaneous fat": (-102, 12, -100, 12, -100, 12, 0.5),
    "visceral fat": (-94, 16, -92, 16, -92, 16, 0.5),
    "muscle": (48, 9, 58, 10, 54, 10, 0.5),
    "cancellous bone": (230, 45, 235, 45, 235, 45, 0.6),
    "cortical bone": (650, 90, 650, 90, 650, 90, 0.5),
    "disc": (85, 10, 90, 10, 88, 10, 0.5),
    "csf": (12, 6, 14, 6, 13, 6, 0.5),
    "liver": (47, 7, 102, 9, 68, 8, 0.6),
    "liver vessel": (38, 6, 165, 12, 115, 25, 0.5),  # bright arteries, half-filled portal and unfilled hepatic veins
    "liver tumour": (26, 10, 60, 16, 60, 20, 0.7),
    "spleen": (34, 10, 124, 12, 120, 35, 0.6),
    "kidney": (15, 19, 184, 20, 175, 20, 0.6),  # arterial: the cortex
    "renal sinus fat": (-85, 15, -80, 15, -82, 15, 0.5),
    "urine": (8, 6, 10, 6, 9, 6, 0.5),  # no excretion yet in any of the three phases
    "kidney tumour": (36, 14, 108, 28, 125, 40, 0.8),  # clear-cell RCC: hypervascular, heterogeneous in arterial
    "pancreas": (0, 27, 114, 14, 115, 14, 0.7),
    "pancreatic fat": (-60, 18, -55, 18, -58, 18, 0.6),
    "aorta": (42, 7, 175, 12, 300, 15, 0.4),
    "vena cava": (38, 7, 138, 12, 80, 20, 0.4),  # arterial: only renal-vein inflow mixes in
    "portal vein": (38, 7, 158, 12, 120, 15, 0.4),
    "stomach wall": (40, 10, 104, 14, 95, 14, 0.6),
    "fluid": (10, 8, 12, 8, 11, 8, 0.5),
    "gas": (-905, 40, -905, 40, -905, 40, 0.5),
    "food": (5, 40, 10, 40, 8, 40, 0.8),
    "bowel wall": (42, 10, 112, 14, 100, 14, 0.6),  # mucosa enhances early
    "collapsed bowel": (38, 14, 96, 18, 85, 18, 0.7),
    "faeces": (-70, 60, -60, 60, -65, 60, 0.9),
    "bile": (8, 6, 10, 6, 9, 6, 0.5),
    # Appended last, so the other tissues keep their indices. The medulla (renal pyramids) is still kidney in
    # every label. Natively and in the portal-venous (near nephrographic) phase it is rendered exactly as the
    # kidney (SAME_AS_OUTSIDE_ARTERIAL): the cortico-medullary difference is an arterial-phase sign.
    "kidney medulla": (15, 19, 184, 20, 75, 12, 0.6),
}
# Outside the arterial phase these tissues take another's per-case values (no draws of their own), so cases
# of the native and portal-venous phases are exactly what they were before the arterial phase existed.
SAME_AS_OUTSIDE_ARTERIAL = {"kidney medulla": "kidney"}
# Arterial spleen: arciform ("zebra") enhancement, red and white pulp filling at different rates. Coarse,
# so most of its sd is the low-frequency field, little is fine texture.
ARTERIAL_FINE_SHARE = {"spleen": 0.25}
PHASES = ("native", "contrast", "arterial")  # "contrast" = portal venous
TISSUE_NAMES = tuple(TISSUES)
T = {name: index for index, name in enumerate(TISSUE_NAMES)}


@dataclass(frozen=True)
class Site:
    """One scanner/protocol and its patients: acquisition, intensity calibration and label conventions.

    The defaults of the fields after `kernel` are the test site's (and so the toy layout's) population."""

    name: str
    organ: str  # the one organ it labels; "all" for the fully labelled test site
    phase: str  # one of PHASES, "alternating" (portal venous / native by case) or "mixed" (contrast_share)
    thickness: float  # slice thickness = spacing, mm
    fov: float  # in-plane field of view, mm (spacing = fov / size)
    noise: float  # sd of the scanner noise, HU
    offset: float  # calibration offset added to every voxel, HU
    table_z: float  # physical z of the anatomy's w = 0, mm
    label_values: dict = field(default_factory=dict)  # part -> value written in the label file
    value_map: dict = field(default_factory=dict)  # value in the file -> class name or "background"
    contrast_share: float = 0.5  # phase "mixed": the share of portal-venous cases
    kernel: float = 0.7  # in-plane correlation of the noise, voxels (reconstruction kernel: small = sharp)
    thickness_range: tuple = ()  # (min, max) mm: slice thickness drawn per case instead of `thickness`
    fat_mm: tuple = (8.0, 30.0)  # subcutaneous fat thickness range: the cohort's body habitus
    liver_tumour_mm: tuple = (5.0, 14.0)  # radius range of liver tumours (painted in the liver site's cases)


# Sites differ as the public datasets they stand for do: contrast phase, reconstruction kernel and noise,
# calibration, slice thickness, field of view and patients. As in those datasets, an organ may be labelled in
# one phase only (the kidney only arterial, as in KiTS19); the test site scans portal venous and native.
SITES = (
    # LiTS-like: mostly portal venous, sharp kernel; seven centres' scanners, so slices from thin to thick
    # (LiTS: 0.7-5 mm), and many large tumours (LiTS lesions reach well over 5 cm).
    Site("liver", "liver", "mixed", 2.5, 380.0, 14.0, 20.0, -260.0,
         {LIVER: 1, LIVER_TUMOUR: 2}, {1: "liver", 2: "liver"}, contrast_share=0.8, kernel=0.45,
         thickness_range=(1.25, 5.0), liver_tumour_mm=(5.0, 30.0)),
    # MSD-spleen-like: portal venous only (patients in chemotherapy for liver metastases), thick slices
    # (median 5 mm), smooth kernel; oncology patients, leaner on average.
    Site("spleen", "spleen", "contrast", 5.0, 420.0, 9.0, -15.0, 110.0, {SPLEEN: 1}, {1: "spleen"},
         kernel=1.3, fat_mm=(5.0, 25.0)),
    # KiTS19-like: every case late arterial / corticomedullary (pre-operative CT of renal tumours), from many
    # referring scanners; median spacing 3 x 0.78 mm (512 px: a 400 mm field of view); an obese cohort on
    # average (mean BMI about 30), so more subcutaneous fat.
    Site("kidney", "kidney", "arterial", 3.0, 400.0, 17.0, 30.0, -480.0,
         {KIDNEY: 1, KIDNEY_TUMOUR: 2}, {1: "kidney", 2: "background"}, kernel=0.7, fat_mm=(12.0, 40.0)),
    # NIH-pancreas-like: portal venous only (about 70 s after injection), thin slices (1.5-2.5 mm)
    Site("pancreas", "pancreas", "contrast", 2.0, 360.0, 15.0, -25.0, 40.0, {PANCREAS: 1}, {1: "pancreas"},
         kernel=0.6),
)
TEST_SITE = Site("test", "all", "alternating", 4.0, 400.0, 11.0, 10.0, -150.0, FULL_VALUES, FULL_VALUE_MAP)
# The user's own hospital: scans from the test site's scanner and population that nobody has labelled (what a
# clinician adds in Slicer beside the public data sets). Only methods with pseudo-labels learn from them.
LOCAL_SITE = replace(TEST_SITE, name="local", organ="none", label_values={}, value_map={})
LAYOUTS = ("multi-site", "toy")
# Bump a layout's version whenever its files change: benchmarks keep each version's phantoms in their own folder,
# so a model trained on older phantoms is never scored as if trained on these. 2: the sites as real data sets.
# 3: the same files plus unlabelled scans of the local site (generate_phantoms(unlabelled_cases=...)).
LAYOUT_VERSIONS = {"multi-site": 3, "toy": 1}


def sites_for(layout: str):
    """(training sites, test site). "multi-site": every site its own scanner, the test site another.
    "toy": the paper's toy set, every case (training and test) from the test site's one acquisition and population;
    training cases still label one organ each, with that organ's site conventions."""
    if layout == "multi-site":
        return SITES, TEST_SITE
    if layout != "toy":
        raise LtudaError(f"unknown phantom layout {layout!r}", fix=f"Choose one of: {', '.join(LAYOUTS)}.")
    own = ("name", "organ", "label_values", "value_map")  # all else (scanner, patients) is the test site's
    acquisition = {f.name: getattr(TEST_SITE, f.name) for f in fields(Site) if f.name not in own}
    return tuple(replace(site, **acquisition) for site in SITES), TEST_SITE


# ---------------------------------------------------------------------------------------------------
# Random fields


def _bspline_matrix(n: int, spacing: float, scale: float) -> np.ndarray:
    """Weights [n, m] of cubic B-spline control points every `scale` mm at n voxels `spacing` apart."""
    t = np.arange(n) * spacing / scale
    knots = np.arange(-1, int(t[-1]) + 3)
    d = np.abs(t[:, None] - knots[None, :])
    w = np.where(d < 1, 2 / 3 - d ** 2 + d ** 3 / 2, np.where(d < 2, (2 - d) ** 3 / 6, 0.0))
    return w.astype(np.float32)


def smooth_field(rng, shape, spacing, scale: float) -> np.ndarray:
    """A zero-mean, unit-sd random field [z, y, x], smooth over `scale` mm.

    Separable cubic B-spline through random control points: three small matrix products, no scipy.
    """
    wz, wy, wx = (_bspline_matrix(n, s, scale) for n, s in zip(shape, spacing))
    coarse = rng.standard_normal((wz.shape[1], wy.shape[1], wx.shape[1])).astype(np.float32)
    f = coarse @ wx.T
    f = np.matmul(wy[None], f)
    f = np.tensordot(wz, f, axes=(1, 0))
    f -= f.mean()
    return f / max(float(f.std()), 1e-6)


def _blur_axis(a: np.ndarray, axis: int, sigma: float) -> np.ndarray:
    """3-tap Gaussian along one axis (sigma in voxels, below ~1), edges replicated."""
    if sigma <= 0.05 or a.shape[axis] < 2:
        return a
    w = math.exp(-1.0 / (2.0 * sigma * sigma))
    k0, k1 = 1.0 / (1.0 + 2.0 * w), w / (1.0 + 2.0 * w)
    a = np.moveaxis(a, axis, 0)
    out = k0 * a
    out[1:] += k1 * a[:-1]
    out[:1] += k1 * a[:1]
    out[:-1] += k1 * a[1:]
    out[-1:] += k1 * a[-1:]
    return np.moveaxis(out, 0, axis)


def blur(a: np.ndarray, sigmas) -> np.ndarray:
    for axis, sigma in enumerate(sigmas):
        a = _blur_axis(a, axis, sigma)
    return a


# ---------------------------------------------------------------------------------------------------
# Geometry and the painting canvas


@dataclass
class Geometry:
    shape: tuple  # (z, y, x) voxels
    spacing: tuple  # (x, y, z) mm, SimpleITK order
    origin: tuple  # (x, y, z) mm
    centre: tuple  # physical (x, y, z) of the anatomy's origin
    angle: float  # in-plane rotation of the patient, radians


def sample_geometry(rng, site: Site, shape_xy) -> Geometry:
    nx, ny = int(shape_xy[0]), int(shape_xy[1])
    spacing_xy = site.fov * rng.uniform(0.97, 1.03) / max(nx, ny)
    coverage = rng.uniform(105.0, 130.0)
    # A site of many scanners: thickness per case (drawn only there, so the other sites' cases keep their draws)
    thickness = float(rng.uniform(*site.thickness_range)) if site.thickness_range else site.thickness
    nz = int(round(coverage / thickness))
    # The scanned slab: w from about -58 (kidneys' lower poles) up to the liver's upper half.
    w_start = -58.0 + rng.normal(0.0, 5.0)
    origin_x = -spacing_xy * (nx - 1) / 2 + rng.uniform(-5, 5)
    origin_y = -spacing_xy * (ny - 1) / 2 + rng.uniform(-5, 5)
    origin = (origin_x, origin_y, site.table_z + w_start)
    centre = (rng.normal(0.0, 6.0), rng.normal(-5.0, 6.0), site.table_z)
    return Geometry((nz, ny, nx), (spacing_xy, spacing_xy, thickness), origin, centre,
                    math.radians(rng.normal(0.0, 4.0)))


class Canvas:
    """Voxel grid with patient coordinates (u, v, w) per voxel, and the tissue and part maps to paint."""

    WARP_MM = 5.0  # sd of the smooth anatomical warp
    WARP_CLIP = 2.5  # warp fields are clipped to this many sd, so structures stay inside their regions

    def __init__(self, geometry: Geometry, rng):
        self.geometry = geometry
        nz, ny, nx = geometry.shape
        sx, sy, sz = geometry.spacing
        self.voxel_zyx = (sz, sy, sx)
        ox, oy, oz = geometry.origin
        cx, cy, cz = geometry.centre
        x = ox + sx * np.arange(nx, dtype=np.float32) - cx
        y = oy + sy * np.arange(ny, dtype=np.float32) - cy
        z = oz + sz * np.arange(nz, dtype=np.float32) - cz
        self.cos, self.sin = math.cos(geometry.angle), math.sin(geometry.angle)
        u2 = self.cos * x[None, :] + self.sin * y[:, None]
        v2 = -self.sin * x[None, :] + self.cos * y[:, None]
        warp = [np.clip(smooth_field(rng, geometry.shape, self.voxel_zyx, 70.0), -self.WARP_CLIP, self.WARP_CLIP)
                * self.WARP_MM for _ in range(3)]
        self.u = u2[None] + warp[0]
        self.v = v2[None] + warp[1]
        self.w = z[:, None, None] + warp[2]
        self.y_rel = y  # the table is level in the scanner, whatever the patient's rotation
        # Boundary deformation of organs: per structure a random mix of two shared fields.
        self.deform_fields = [smooth_field(rng, geometry.shape, self.voxel_zyx, 28.0) for _ in range(2)]
        self.tissue = np.zeros(geometry.shape, np.uint8)
        self.part = np.zeros(geometry.shape, np.uint8)
        self.cavity = np.zeros(geometry.shape, bool)

    def region(self, lo, hi):
        """Voxel slices covering the patient box lo..hi (u, v, w mm), or None if it misses the grid."""
        margin = self.WARP_MM * self.WARP_CLIP + 1.0  # per axis: the most the warp moves anything
        corners = [(u, v) for u in (lo[0] - margin, hi[0] + margin) for v in (lo[1] - margin, hi[1] + margin)]
        xs = [self.cos * u - self.sin * v for u, v in corners]
        ys = [self.sin * u + self.cos * v for u, v in corners]
        g = self.geometry
        bounds = []
        for axis, (low, high) in enumerate(((lo[2] - margin, hi[2] + margin), (min(ys), max(ys)), (min(xs), max(xs)))):
            start = g.origin[2 - axis] - g.centre[2 - axis]
            step = g.spacing[2 - axis]
            i0 = max(0, int(math.floor((low - start) / step)))
            i1 = min(g.shape[axis], int(math.ceil((high - start) / step)) + 1)
            if i1 <= i0:
                return None
            bounds.append(slice(i0, i1))
        return tuple(bounds)

    def coords(self, sl):
        return self.u[sl], self.v[sl], self.w[sl]

    def tube(self, points, radii):
        """(slices, f) of a union of balls: f = min over points of |p - c|^2 / r^2, radii [M, 2] =
        (in-plane, cranio-caudal). Each ball is evaluated only on its own small box."""
        lo, hi = tube_box(points, radii)
        sl = self.region(lo, hi)
        if sl is None:
            return None
        f = np.full(tuple(s.stop - s.start for s in sl), np.inf, np.float32)
        for (cu, cv, cw), (r, rz) in zip(points, radii):
            box = self.region((cu - r, cv - r, cw - rz), (cu + r, cv + r, cw + rz))
            if box is None:
                continue
            inner = tuple(slice(max(b.start, s.start), min(b.stop, s.stop)) for b, s in zip(box, sl))
            if any(i.stop <= i.start for i in inner):
                continue
            local = tuple(slice(i.start - s.start, i.stop - s.start) for i, s in zip(inner, sl))
            u, v, w = self.coords(inner)
            g = ((u - cu) ** 2 + (v - cv) ** 2) / (r * r) + (w - cw) ** 2 / (rz * rz)
            np.minimum(f[local], g, out=f[local])
        return sl, f

    def deformation(self, sl, rng, amplitude: float):
        """A smooth random field on the region, sd `amplitude`: scales an organ's radius by 1 + field."""
        a = rng.uniform(0, 2 * math.pi)
        return amplitude * (math.cos(a) * self.deform_fields[0][sl] + math.sin(a) * self.deform_fields[1][sl])

    def paint(self, sl, mask, tissue: str, part: int = BG):
        self.tissue[sl][mask] = T[tissue]
        self.part[sl][mask] = part


# ---------------------------------------------------------------------------------------------------
# Shapes: normalised implicit functions, <= 1 inside


def ellipsoid(u, v, w, centre, radii, angle: float = 0.0):
    du, dv, dw = u - centre[0], v - centre[1], w - centre[2]
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        du, dv = c * du + s * dv, -s * du + c * dv
    return (du / radii[0]) ** 2 + (dv / radii[1]) ** 2 + (dw / radii[2]) ** 2


def ellipse(u, v, centre, radii):
    """An elliptic cylinder along w (vessels, spine), axis-aligned in the patient."""
    return ((u - centre[0]) / radii[0]) ** 2 + ((v - centre[1]) / radii[1]) ** 2


def densify(points, radii, step: float):
    """Points along the polyline through `points`, at most `step` mm apart, with interpolated radii."""
    points, radii = np.asarray(points, float), np.asarray(radii, float)
    out_p, out_r = [points[:1]], [radii[:1]]
    for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
        n = max(1, int(math.ceil(np.linalg.norm(b - a) / step)))
        t = np.arange(1, n + 1)[:, None] / n
        out_p.append(a + t * (b - a))
        out_r.append(ra + t * (rb - ra))
    return np.concatenate(out_p), np.concatenate(out_r)


def tube_box(points, radii):
    points, radii = np.asarray(points), np.asarray(radii)
    r = radii.max(axis=0)
    pad = np.array([r[0], r[0], r[1]])
    return points.min(axis=0) - pad, points.max(axis=0) + pad


# ---------------------------------------------------------------------------------------------------
# Anatomy: one function per structure group, painted in this order


def _jitter(rng, *sds):
    return np.array([rng.normal(0.0, s) for s in sds])


class Phantom:
    """Samples one patient and paints it on a canvas."""

    def __init__(self, canvas: Canvas, rng, fat_mm=(8.0, 30.0)):
        self.c = canvas
        self.rng = rng
        r = rng
        # Organs are placed relative to A, B (the frame of a lean patient); the abdominal cavity ends 28 mm
        # inside it and the wall muscle and subcutaneous fat lie outside the cavity, so an obese patient
        # has a larger outline, not squeezed organs.
        self.A = r.uniform(135, 165)  # half width, mm
        self.B = r.uniform(95, 120)  # half depth
        self.fat = r.uniform(*fat_mm)  # subcutaneous fat thickness (the site's cohort)
        self.wall = r.uniform(7, 12)  # abdominal wall muscle thickness
        self.skin = self.wall + self.fat - 28.0  # skin outline = the A, B outline grown by this
        self.power = r.uniform(2.2, 2.7)  # body outline: superellipse, flatter than an ellipse
        self.vs = self.B - 28.0 + self.wall - r.uniform(48, 58)  # vertebral body centre, v
        self.fine_texture = smooth_field(r, canvas.geometry.shape, canvas.voxel_zyx, 7.0)  # lobules, mottling

    def paint(self, liver_tumours: int = 0, kidney_tumour: bool = False, liver_tumour_mm=(5.0, 14.0)):
        self.table()
        self.body_wall()
        self.ribs()
        self.back_muscles()
        self.colon()
        self.small_bowel()
        self.duodenum()
        self.stomach()
        self.spleen()
        self.liver()
        self.gallbladder()
        self.kidneys()
        self.pancreas()
        self.liver_vessels()
        for _ in range(liver_tumours):
            self.tumour(LIVER, "liver tumour", LIVER_TUMOUR, self.rng.uniform(*liver_tumour_mm), inside_only=True)
        if kidney_tumour:
            self.tumour(KIDNEY, "kidney tumour", KIDNEY_TUMOUR, self.rng.uniform(8, 16), inside_only=False)
        self.great_vessels()
        self.spine()

    # -- helpers
    def _body_level(self, u, v, inset: float):
        """Superellipse value of the skin outline shrunk by `inset` mm (<= 1 inside)."""
        a, b = self.A + self.skin - inset, self.B + self.skin - inset
        return np.abs(u / a) ** self.power + np.abs(v / b) ** self.power

    def _blob(self, centre, radii, angle, deform, within=None):
        """(slices, mask, f) of a deformed, rotated ellipsoid (f: its undeformed level); None if off the grid."""
        radii = np.asarray(radii, float)
        in_plane = np.full(2, radii[:2].max()) if angle else radii[:2]  # rotated: within its largest radius
        reach = np.append(in_plane, radii[2]) * (1 + 3 * deform)
        sl = self.c.region(np.asarray(centre) - reach, np.asarray(centre) + reach)
        if sl is None:
            return None
        u, v, w = self.c.coords(sl)
        f = ellipsoid(u, v, w, centre, radii, angle)
        mask = f <= (1 + self.c.deformation(sl, self.rng, deform)) ** 2
        if within is not None:
            mask &= within(sl)
        return sl, mask, f

    def _tube(self, key_points, key_radii, deform=0.08, step=None):
        """(slices, f) of a deformed tube through key points (bowel, vessels); f <= 1 inside."""
        radii = np.asarray(key_radii, float)
        points, radii = densify(key_points, radii, step or 0.5 * radii.min())
        hit = self.c.tube(points, radii)
        if hit is None:
            return None
        sl, f = hit
        return sl, f / (1 + self.c.deformation(sl, self.rng, deform)) ** 2

    def _column(self, centre_uv, radii_uv, tissue):
        """A vertical elliptic cylinder through the whole scan (aorta, vena cava)."""
        lo = (centre_uv[0] - radii_uv[0], centre_uv[1] - radii_uv[1], -1e4)
        hi = (centre_uv[0] + radii_uv[0], centre_uv[1] + radii_uv[1], 1e4)
        sl = self.c.region(lo, hi)
        if sl is not None:
            u, v, _ = self.c.coords(sl)
            self.c.paint(sl, ellipse(u, v, centre_uv, radii_uv) <= 1, tissue)

    def _in_cavity(self, sl):
        return self.c.cavity[sl]

    # -- structures
    def table(self):
        """The scanner table under the patient: a flat plate at fixed height."""
        y_top = self.B + self.skin + 14.0
        rows = (self.c.y_rel >= y_top) & (self.c.y_rel < y_top + 7.0)
        self.c.tissue[:, rows, :] = T["table"]

    def body_wall(self):
        u, v = self.c.u, self.c.v
        outer = self._body_level(u, v, 0.0) <= 1
        muscle = self._body_level(u, v, self.fat) <= 1
        self.c.cavity = self._body_level(u, v, self.fat + self.wall) <= 1
        self.c.tissue[outer] = T["subcutaneous fat"]
        self.c.tissue[muscle] = T["muscle"]
        self.c.tissue[self.c.cavity] = T["visceral fat"]

    def ribs(self):
        """Oblique ribs in the wall of the upper abdomen: bands sloping down anteriorly, lowest laterally."""
        u, v, w = self.c.u, self.c.v, self.c.w
        in_wall = (self._body_level(u, v, self.fat - 2) <= 1) & ~self.c.cavity
        slope = w - v  # one rib descends 1 mm per mm anteriorly, so a slice cuts it into short arcs
        phase = self.rng.uniform(0, 28)
        band = np.mod(slope - phase, 28.0) < 10.0
        costal_margin = -20 + self.rng.normal(0, 6) + 0.5 * np.abs(v)
        ribs = in_wall & band & (w > costal_margin) & (v > -0.55 * self.B)
        self.c.tissue[ribs] = T["cortical bone"]

    def back_muscles(self):
        r = self.rng
        for side in (-1, 1):
            hit = self._blob((side * r.uniform(28, 36), self.vs + r.uniform(38, 46), 0.0),
                             (r.uniform(24, 30), r.uniform(19, 25), 400.0), side * math.radians(r.normal(10, 5)), 0.06,
                             within=lambda sl: self._body_level(*self.c.coords(sl)[:2], self.fat) <= 1)
            if hit:
                self.c.paint(hit[0], hit[1], "muscle")
            self._psoas(side)

    def _psoas(self, side):
        """Psoas: grows caudally from the upper lumbar spine, beside the vertebral body."""
        sl = self.c.region((-110, self.vs - 40, -400), (110, self.vs + 40, 30))
        if sl is None:
            return
        u, v, w = self.c.coords(sl)
        r = np.clip(5.0 + 0.24 * (22.0 - w), 0.0, 26.0) * self.rng.uniform(0.85, 1.15)
        safe = np.maximum(r, 1e-3)
        f = ellipse(u, v, (side * (19.0 + r), self.vs + 4), (safe, 0.85 * safe))
        self.c.paint(sl, (r > 3) & (f <= 1) & self.c.cavity[sl], "muscle")

    def _bowel_loop(self, sl, f, radius, content: str, wall_mm: float = 2.5):
        """Fill a tube with its content, then its wall (enhancing, as real bowel wall)."""
        inside = (f <= 1) & self.c.cavity[sl]
        if content == "collapsed bowel":
            self.c.paint(sl, inside, "collapsed bowel")
            return
        self.c.paint(sl, inside, content)
        lumen = (1 - wall_mm / radius) ** 2
        self.c.paint(sl, inside & (f > lumen), "bowel wall")

    def colon(self):
        r = self.rng
        A, B = self.A, self.B
        keys = np.array([
            (-0.62 * A, -0.05 * B, -95), (-0.62 * A, -0.1 * B, -20), (-0.5 * A, -0.4 * B, 2),
            (0.0, -0.62 * B, r.uniform(-12, 8)), (0.5 * A, -0.3 * B, 18), (0.66 * A, 0.18 * B, 0),
            (0.66 * A, 0.2 * B, -95),
        ]) + np.array([_jitter(r, 8, 8, 5) for _ in range(7)])
        radius = r.uniform(13, 20)
        radii = [(radius, radius)] * 5 + [(0.8 * radius, 0.8 * radius)] * 2
        hit = self._tube(keys, radii)
        if hit is None:
            return
        sl, f = hit
        self._bowel_loop(sl, f, radius, "faeces")
        # Gas rises: anterior part of the lumen, patchy.
        gas = (f <= 0.6) & (self.c.v[sl] < keys[:, 1].mean() - r.uniform(0, 10)) & self.c.cavity[sl]
        self.c.paint(sl, gas & (self.c.deform_fields[1][sl] > 0.3), "gas")

    def small_bowel(self):
        r = self.rng
        contents = ("fluid", "collapsed bowel", "gas")
        for _ in range(int(r.integers(8, 15))):
            start = np.array([r.uniform(-0.5, 0.5) * self.A, r.uniform(-0.8, 0.05) * self.B, r.uniform(-80, -8)])
            steps = r.normal(0.0, 1.0, size=(4, 3))
            steps = 14.0 * steps / np.linalg.norm(steps, axis=1, keepdims=True)
            keys = np.vstack([start, start + np.cumsum(steps, axis=0)])
            radius = r.uniform(8, 12)
            hit = self._tube(keys, [(radius, radius)] * len(keys))
            if hit:
                self._bowel_loop(*hit, radius, contents[r.choice(3, p=(0.45, 0.4, 0.15))])

    def duodenum(self):
        """The C-loop around the pancreatic head: fluid or collapsed, an intensity twin of the pancreas."""
        r = self.rng
        A, B, vs = self.A, self.B, self.vs
        keys = np.array([
            (0.05 * A, -0.45 * B, 22), (-0.3 * A, -0.25 * B, 16), (-0.37 * A, vs - 52, -4),
            (-0.3 * A, vs - 42, -30), (0.0, vs - 36, -38), (0.14 * A, vs - 46, -26),
        ]) + np.array([_jitter(r, 4, 4, 4) for _ in range(6)])
        radius = r.uniform(9, 12)
        hit = self._tube(keys, [(radius, radius)] * len(keys))
        if hit:
            self._bowel_loop(*hit, radius, ("fluid", "collapsed bowel")[int(r.integers(2))], wall_mm=3.0)

    def stomach(self):
        r = self.rng
        centre = (0.36 * self.A, -0.32 * self.B, 36.0) + _jitter(r, 6, 6, 8)
        radii = (r.uniform(32, 45), r.uniform(25, 35), r.uniform(35, 48))
        hit = self._blob(centre, radii, math.radians(r.uniform(-30, 10)), 0.08, within=self._in_cavity)
        if hit is None:
            return
        sl, mask, f = hit
        content = ("fluid", "food", "collapsed bowel")[r.choice(3, p=(0.5, 0.3, 0.2))]
        self.c.paint(sl, mask, content)
        wall = mask & (f > (1 - 5.0 / min(radii)) ** 2)
        self.c.paint(sl, wall, "stomach wall")
        # Supine patient: gas floats anteriorly (small v) above an air-fluid level.
        level = centre[1] - radii[1] * r.uniform(0.2, 0.9)
        self.c.paint(sl, mask & ~wall & (self.c.v[sl] < level), "gas")

    def spleen(self):
        r = self.rng
        centre = (0.58 * self.A, 0.36 * self.B, 27.0) + _jitter(r, 6, 6, 8)
        s = r.uniform(0.85, 1.15)
        radii = (23 * s * r.uniform(0.9, 1.1), 0.45 * self.B * s, 45 * s * r.uniform(0.9, 1.1))
        hit = self._blob(centre, radii, math.radians(40 + r.normal(0, 8)), 0.1, within=self._in_cavity)
        if hit:
            self.c.paint(hit[0], hit[1], "spleen", SPLEEN)

    def liver(self):
        """Right lobe (inferior edge sloping up medially, leaving room for gallbladder and duodenum) + left lobe."""
        r = self.rng
        A, B = self.A, self.B
        s = r.uniform(0.88, 1.12)
        centre = (-0.46 * A, -0.02 * B, 32.0) + _jitter(r, 5, 5, 6)
        radii = (0.44 * A * s * r.uniform(0.92, 1.08), 0.62 * B * s, 62 * s * r.uniform(0.92, 1.08))
        self.liver_centre, self.liver_radii = np.asarray(centre), np.asarray(radii)
        cut = r.normal(0, 5)
        hit = self._blob(centre, radii, math.radians(r.normal(0, 6)), 0.1, within=self._in_cavity)
        if hit:
            sl, mask, _ = hit
            u, _, w = self.c.coords(sl)
            self.c.paint(sl, mask & (w > -38 + cut + 0.55 * (u + 0.9 * A)), "liver", LIVER)
        left = (0.05 * A, -0.5 * B, 46.0) + _jitter(r, 6, 5, 6)
        left_radii = (0.38 * A * s * r.uniform(0.85, 1.15), 0.28 * B * s, 30 * s * r.uniform(0.85, 1.15))
        hit = self._blob(left, left_radii, math.radians(r.normal(0, 10)), 0.1, within=self._in_cavity)
        if hit:
            self.c.paint(hit[0], hit[1], "liver", LIVER)

    def gallbladder(self):
        r = self.rng
        if r.random() < 0.15:  # cholecystectomy
            return
        centre = (-0.3 * self.A, -0.45 * self.B, 8.0) + _jitter(r, 5, 5, 5)
        radii = (r.uniform(11, 17), r.uniform(11, 17), r.uniform(22, 32))
        hit = self._blob(centre, radii, math.radians(r.normal(0, 15)), 0.05, within=self._in_cavity)
        if hit:
            self.c.paint(hit[0], hit[1], "bile")

    def kidneys(self):
        """Both kidneys, one class; hilum (sinus fat, pelvis) faces anteromedially and is not kidney."""
        r = self.rng
        self.kidney_fits = []
        for side, w0 in ((1, -2.0), (-1, -16.0)):
            centre = np.array((side * 0.45 * self.A, self.vs + r.uniform(0, 8), w0)) + _jitter(r, 5, 4, 8)
            radii = np.array((r.uniform(24, 29), r.uniform(19, 24), r.uniform(48, 56)))
            angle = side * math.radians(35 + r.normal(0, 8))
            hit = self._blob(centre, radii, angle, 0.06, within=self._in_cavity)
            if hit is None:
                continue
            sl, mask, f = hit
            self.c.paint(sl, mask, "kidney", KIDNEY)
            self.c.paint(sl, mask & self._pyramids(sl, centre, radii, angle, f), "kidney medulla", KIDNEY)
            # Long axis in-plane: (cos a, sin a) points lateral-posterior; the hilum is at the other end.
            medial = -np.array((math.cos(angle), math.sin(angle), 0.0)) * side
            u, v, w = self.c.coords(sl)
            sinus = ellipsoid(u, v, w, centre + 0.85 * radii[0] * medial, radii * (0.5, 0.55, 0.4), angle) <= 1
            self.c.paint(sl, mask & sinus, "renal sinus fat")
            pelvis = ellipsoid(u, v, w, centre + 0.7 * radii[0] * medial, radii * (0.25, 0.3, 0.18), angle) <= 1
            self.c.paint(sl, mask & pelvis, "urine")

    def _pyramids(self, sl, centre, radii, angle, f):
        """The renal pyramids: wedges in the inner part of the kidney (its undeformed level f), separated by
        cortical columns, about eight around the coronal section; the outer cortex is about 8 mm thick.
        Deterministic (no draws), so the cases' random streams are unchanged."""
        u, v, w = self.c.coords(sl)
        c, s = math.cos(angle), math.sin(angle)
        du, dv = u - centre[0], v - centre[1]
        across = (c * du + s * dv) / radii[0]  # the kidney's in-plane long axis, as ellipsoid() rotates it
        along = (w - centre[2]) / radii[2]
        theta = np.arctan2(along, across)
        return (f <= 0.4) & (np.cos(8.0 * theta) > -0.3)

    def pancreas(self):
        """Tail at the splenic hilum, body in front of the aorta, head beside the duodenum; lobulated with fat."""
        r = self.rng
        A, B, vs = self.A, self.B, self.vs
        tail = np.array((0.52 * A, 0.15 * B, 14.0)) + _jitter(r, 6, 5, 5)
        body = np.array((0.08 * A, vs - 48, 4.0)) + _jitter(r, 5, 3, 4)
        head = np.array((-0.2 * A, vs - 46, -10.0)) + _jitter(r, 5, 3, 5)
        control = 2 * body - (tail + head) / 2  # the quadratic Bezier passes through `body`
        t = np.linspace(0, 1, 28)[:, None]
        points = (1 - t) ** 2 * tail + 2 * t * (1 - t) * control + t ** 2 * head
        s = r.uniform(0.85, 1.15)
        radius = s * np.interp(t[:, 0], (0, 0.5, 1), (8.0, 9.5, 14.0))
        zradius = s * np.interp(t[:, 0], (0, 0.5, 1), (9.0, 10.0, 17.0))
        radii = np.stack([radius, zradius], axis=1)
        hit = self.c.tube(points, radii)
        if hit is None:
            return
        sl, f = hit
        f = f / (1 + self.c.deformation(sl, r, 0.12)) ** 2
        mask = (f <= 1) & self.c.cavity[sl]
        self.c.paint(sl, mask, "pancreas", PANCREAS)
        # Fatty clefts between lobules (more with age): still pancreas in every label set.
        self.c.paint(sl, mask & (self.fine_texture[sl] > r.uniform(1.2, 2.0)), "pancreatic fat", PANCREAS)
        # Splenic vein along the back of the body and tail.
        vein = points[:18] + np.array((0.0, 1.0, 0.0)) * (radii[:18, :1] + 2.0)
        hit = self._tube(vein, [(4.5, 4.5)] * len(vein), deform=0.0)
        if hit:
            self.c.paint(hit[0], (hit[1] <= 1) & self.c.cavity[hit[0]], "portal vein")

    def liver_vessels(self):
        """Portal branches from the hilum and hepatic veins towards the IVC, inside the liver only."""
        r = self.rng
        c, rad = self.liver_centre, self.liver_radii
        hilum = c + rad * (0.5, 0.1, -0.35)
        top = np.array((-26.0, self.vs - 22, c[2] + 0.8 * rad[2]))
        for origin, n in ((hilum, 4), (top, 3)):
            for _ in range(n):
                target = c + rad * r.uniform(-0.7, 0.7, 3) * (1, 1, 0.8)
                mid = (origin + target) / 2 + _jitter(r, 8, 8, 8)
                hit = self._tube([origin, mid, target], [(6.0, 6.0), (4.5, 4.5), (2.5, 2.5)], deform=0.0, step=2.0)
                if hit:
                    sl, f = hit
                    self.c.paint(sl, (f <= 1) & (self.c.part[sl] == LIVER), "liver vessel", LIVER)

    def tumour(self, organ_part, tissue, part, radius, inside_only):
        """A deformed ball centred in the organ; clipped to it (liver) or bulging out of it (kidney)."""
        where = np.argwhere(self.c.part == organ_part)
        if len(where) == 0:
            return
        z, y, x = where[self.rng.integers(len(where))]
        centre = (self.c.u[z, y, x], self.c.v[z, y, x], self.c.w[z, y, x])
        hit = self._blob(centre, (radius,) * 3, 0.0, 0.12, within=self._in_cavity)
        if hit is None:
            return
        sl, mask, _ = hit
        allowed = self.c.part[sl] == organ_part
        if not inside_only:  # exophytic: may push into the surrounding fat, never into another organ
            allowed |= (self.c.part[sl] == BG) & (self.c.tissue[sl] == T["visceral fat"])
        self.c.paint(sl, mask & allowed, tissue, part)

    def great_vessels(self):
        r = self.rng
        ra = r.uniform(9, 12.5)
        self._column((r.uniform(8, 16), self.vs - 26 + r.normal(0, 2)), (ra, ra), "aorta")
        self._column((-r.uniform(22, 30), self.vs - 22 + r.normal(0, 2)), (r.uniform(11, 15), r.uniform(7, 10)),
                     "vena cava")

    def spine(self):
        """Vertebral bodies (cortex, cancellous core, discs), canal, arch and spinous process."""
        r = self.rng
        vs = self.vs
        sl = self.c.region((-50, vs - 30, -400), (50, vs + 70, 400))
        if sl is None:
            return
        u, v, w = self.c.coords(sl)
        s = r.uniform(0.9, 1.1)
        body = ellipse(u, v, (0, vs), (19 * s, 16 * s))
        disc = np.mod(w - r.uniform(0, 33), 33.0) < 7.0  # 26 mm vertebral bodies, 7 mm discs
        self.c.paint(sl, body <= 1, "cortical bone")
        self.c.paint(sl, (body <= 0.72) & ~disc, "cancellous bone")
        self.c.paint(sl, (body <= 0.8) & disc, "disc")
        arch = ellipse(u, v, (0, vs + 27 * s), (16 * s, 13 * s)) <= 1
        spinous = ellipse(u, v, (0, vs + 44 * s), (5, 13 * s)) <= 1
        canal = ellipse(u, v, (0, vs + 25 * s), (9 * s, 8 * s)) <= 1
        self.c.paint(sl, arch | spinous, "cortical bone")
        self.c.paint(sl, canal, "csf")


# ---------------------------------------------------------------------------------------------------
# Intensities


def tissue_luts(rng, phase: str):
    """Per-case mean and texture amplitudes per tissue (patients and contrast timing vary)."""
    if phase not in PHASES:
        raise ValueError(f"unknown contrast phase {phase!r}")
    n = len(TISSUE_NAMES)
    mean, low_a, low_b, fine = (np.zeros(n, np.float32) for _ in range(4))
    enhancement = rng.uniform(0.85, 1.15)  # contrast timing / dose
    arterial = rng.uniform(0.85, 1.2)  # the aorta varies most with timing
    for i, name in enumerate(TISSUE_NAMES):
        if phase != "arterial" and name in SAME_AS_OUTSIDE_ARTERIAL:
            continue  # copied below, after every draw
        n_mean, n_sd, c_mean, c_sd, a_mean, a_sd, fine_share = TISSUES[name]
        if phase == "native":
            m, sd = n_mean, n_sd
        else:
            gain = arterial if name == "aorta" else enhancement
            e_mean, sd = (c_mean, c_sd) if phase == "contrast" else (a_mean, a_sd)
            m = n_mean + gain * (e_mean - n_mean)
            if phase == "arterial":
                fine_share = ARTERIAL_FINE_SHARE.get(name, fine_share)
        mean[i] = m + (rng.normal(0, 4) if abs(n_mean) < 300 else 0.0)  # soft tissues vary between patients
        low = sd * math.sqrt(1 - fine_share ** 2)
        angle = rng.uniform(0, 2 * math.pi)  # decorrelate neighbouring tissues' slow variations
        low_a[i], low_b[i] = low * math.cos(angle), low * math.sin(angle)
        fine[i] = sd * fine_share
    if phase != "arterial":
        for name, like in SAME_AS_OUTSIDE_ARTERIAL.items():
            i, j = T[name], T[like]
            mean[i], low_a[i], low_b[i], fine[i] = mean[j], low_a[j], low_b[j], fine[j]
    return mean, low_a, low_b, fine


def render_hu(canvas: Canvas, phantom: Phantom, rng, site: Site, phase: str) -> np.ndarray:
    """Tissue map -> int16 HU: texture, partial-volume blur, correlated noise, site offset."""
    shape, voxel = canvas.geometry.shape, canvas.voxel_zyx
    mean, low_a, low_b, fine = tissue_luts(rng, phase)
    t = canvas.tissue
    hu = mean[t]
    hu += low_a[t] * smooth_field(rng, shape, voxel, 16.0)
    hu += low_b[t] * smooth_field(rng, shape, voxel, 16.0)
    hu += fine[t] * phantom.fine_texture
    hu += 3.0 * smooth_field(rng, shape, voxel, 150.0)  # scanner shading
    # Partial volume: about a voxel's worth of mixing in-plane and over the slice profile.
    hu = blur(hu, (0.35, 0.4, 0.4))
    noise = blur(rng.standard_normal(shape, dtype=np.float32), (0.0, site.kernel, site.kernel))
    hu += noise * (site.noise / float(noise.std()))
    hu += site.offset
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


# ---------------------------------------------------------------------------------------------------
# One case, the data set


@dataclass
class PhantomCase:
    image: np.ndarray  # int16 HU [z, y, x]
    parts: np.ndarray  # uint8 parts [z, y, x]
    geometry: Geometry
    phase: str


def make_case(rng, site: Site, shape_xy, phase: str) -> PhantomCase:
    geometry = sample_geometry(rng, site, shape_xy)
    canvas = Canvas(geometry, rng)
    phantom = Phantom(canvas, rng, site.fat_mm)
    liver_tumours = int(rng.integers(1, 4)) if site.organ == "liver" else 0
    phantom.paint(liver_tumours=liver_tumours, kidney_tumour=site.organ == "kidney",
                  liver_tumour_mm=site.liver_tumour_mm)
    image = render_hu(canvas, phantom, rng, site, phase)
    return PhantomCase(image, canvas.part, geometry, phase)


def label_array(parts: np.ndarray, values: dict) -> np.ndarray:
    lut = np.zeros(256, np.uint8)
    for part, value in values.items():
        lut[part] = value
    return lut[parts]


def write_volume(array: np.ndarray, geometry: Geometry, path: Path):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in geometry.spacing))
    image.SetOrigin(tuple(float(o) for o in geometry.origin))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))  # LPS, axial
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # SimpleITK's gzip writer may not notice a full disk: check the uncompressed size up front.
        cause = failed_write_cause(path.parent, array.nbytes)
        if cause is not None:
            raise cause
        with itk_path(path) as safe:
            sitk.WriteImage(image, safe, True)
    except (OSError, RuntimeError) as exc:
        cause = exc if isinstance(exc, OSError) else failed_write_cause(path.parent, array.nbytes)
        if cause is None:
            raise
        path.unlink(missing_ok=True)  # never a half-written phantom
        raise write_error(cause, path, "phantom volume", array.nbytes) from None


def case_phase(site: Site, index: int) -> str:
    """"native", "contrast" (portal venous) or "arterial" for case `index` of the site."""
    if site.phase == "alternating":
        return "contrast" if index % 2 == 0 else "native"
    if site.phase == "mixed":  # a low-discrepancy sequence: every run of cases keeps close to the share
        return "contrast" if ((index + 0.5) * 0.6180339887) % 1.0 < site.contrast_share else "native"
    return site.phase


def _check_arguments(cases_per_site, test_cases, shape, unlabelled_cases=0):
    if int(unlabelled_cases) < 0 or int(unlabelled_cases) > 1000:
        raise LtudaError(f"unlabelled_cases must be 0 to 1000 (got {unlabelled_cases})")
    if int(cases_per_site) < 1:
        raise LtudaError(f"cases_per_site must be at least 1 (got {cases_per_site})",
                         fix="Each site must label its organ in at least one case.")
    if int(test_cases) < 0:
        raise LtudaError(f"test_cases must be 0 or more (got {test_cases})")
    if len(shape) != 2 or min(int(s) for s in shape) < 16:
        raise LtudaError(f"shape must be two in-plane sizes of at least 16 voxels (got {tuple(shape)})")
    # Upper bounds: a typo like 100000 would otherwise write for days or fill the disk.
    if int(cases_per_site) > 1000 or int(test_cases) > 1000:
        raise LtudaError(f"at most 1000 cases per site and 1000 test cases (got {cases_per_site} and {test_cases})")
    if max(int(s) for s in shape) > 1024:
        raise LtudaError(f"the in-plane size must be at most 1024 voxels (got {tuple(shape)})")


def generate_phantoms(out_dir, cases_per_site: int = 4, test_cases: int = 4, shape=(96, 96), seed: int = 0,
                      full_labels: bool = True, report=None, layout: str = "multi-site", holdout_per_site: int = 0,
                      unlabelled_cases: int = 0) -> Path:
    """Write the synthetic partially labelled data set; returns `out_dir/dataset.json`.

    Layout: images/<id>.nii.gz (int16 HU), labels/<id>.nii.gz (uint8, the site's own label values, as
    recorded in the manifest's "labels"), and with `full_labels` labels_full/<id>.nii.gz (values 1..4,
    each training case's "label_full", for diagnostics) plus dataset_full.json, where the same training
    cases label all four organs.
    Case i of a site depends only on (seed, site, i), so adding cases keeps the existing ones.
    `layout`: "multi-site" (a scanner per site) or "toy" (one acquisition for all; see sites_for).
    `holdout_per_site`: more cases of each training site, fully labelled, listed in dataset_holdout.json
    (never in dataset.json): what a method scores on its own sites' and other sites' images.
    `unlabelled_cases`: training cases of the local site (LOCAL_SITE: the test site's scanner and patients)
    that label no organ, as a hospital's own scans; their full labels are only in labels_full (diagnostics)
    and in dataset_full.json.
    """
    _check_arguments(cases_per_site, test_cases, shape, unlabelled_cases)
    sites, test_site = sites_for(layout)
    out = Path(out_dir)
    classes = default_classes()
    names = [c["name"] for c in classes]
    started = time.time()
    plan = [(k, site, i) for k, site in enumerate(sites) for i in range(int(cases_per_site))]
    plan += [(len(sites), test_site, i) for i in range(int(test_cases))]
    plan += [(k, site, i) for k, site in enumerate(sites)
             for i in range(int(cases_per_site), int(cases_per_site) + int(holdout_per_site))]
    plan += [(len(sites) + 1, LOCAL_SITE, i) for i in range(int(unlabelled_cases))]  # appended: the rest stays
    partial, full, holdout = [], [], []
    for site_index, site, i in plan:
        case_id = f"{site.name}_{i:03d}"
        phase = case_phase(site, i)
        case = make_case(np.random.default_rng([int(seed), site_index, i]), site, shape, phase)
        image_path = out / "images" / f"{case_id}.nii.gz"
        write_volume(case.image, case.geometry, image_path)
        extra = {"site": site.name, "phase": phase}
        if report is not None:
            report.log(f"phantom {case_id}: {phase}, {case.image.shape[0]} slices of {case.geometry.spacing[2]:g} mm")
        if i >= int(cases_per_site) and site not in (test_site, LOCAL_SITE):  # a held-out case: full labels only
            full_path = out / "labels_full" / f"{case_id}.nii.gz"
            write_volume(label_array(case.parts, FULL_VALUES), case.geometry, full_path)
            holdout.append(Case(case_id, image_path, full_path, list(names), dict(FULL_VALUE_MAP), "test", extra))
            continue
        if site is LOCAL_SITE:  # no label file: the case labels nothing
            full_path = out / "labels_full" / f"{case_id}.nii.gz" if full_labels else None
            partial.append(Case(case_id, image_path, None, [], {}, "train", extra, label_full=full_path))
            if full_labels:
                write_volume(label_array(case.parts, FULL_VALUES), case.geometry, full_path)
                full.append(Case(case_id, image_path, full_path, list(names), dict(FULL_VALUE_MAP), "train", extra))
            continue
        label_path = out / "labels" / f"{case_id}.nii.gz"
        write_volume(label_array(case.parts, site.label_values), case.geometry, label_path)
        if site is test_site:
            test_case = Case(case_id, image_path, label_path, list(names), dict(FULL_VALUE_MAP), "test", extra)
            partial.append(test_case)
            full.append(test_case)
            continue
        full_path = out / "labels_full" / f"{case_id}.nii.gz" if full_labels else None
        partial.append(Case(case_id, image_path, label_path, [site.organ], dict(site.value_map), "train", extra,
                            label_full=full_path))
        if full_labels:
            write_volume(label_array(case.parts, FULL_VALUES), case.geometry, full_path)
            full.append(Case(case_id, image_path, full_path, list(names), dict(FULL_VALUE_MAP), "train", extra))
    manifest = write_manifest(out / "dataset.json", classes, partial, name=f"ltuda-phantoms-{layout}")
    if full_labels:
        write_manifest(out / "dataset_full.json", classes, full, name=f"ltuda-phantoms-{layout}-full")
    if holdout:
        write_manifest(out / "dataset_holdout.json", classes, holdout, name=f"ltuda-phantoms-{layout}-holdout")
    if report is not None:
        report.log(f"wrote {len(plan)} phantom cases to {out} in {time.time() - started:.1f} s")
    return manifest
