"""Procedural anatomy of the phantom dataset: tissue label maps of a pelvis and a head.

The anatomy is designed in millimetres for a reference field of view (pelvis 256 x 160 x
160 mm, head 128 x 160 x 128 mm, see :data:`REFERENCE_FOV_MM`) and evaluated on the
requested grid stretched onto it, so a smaller ``shape`` gives a smaller patient with the
same structures. Axes follow RAS+: ``x`` left-right, ``y`` posterior -> anterior (the
patient lies supine, so gas rises to ``+y``), ``z`` inferior -> superior.

Every structure is an (optionally bent and rotated) ellipsoid or a stack of per-slice
ellipses, evaluated inside its bounding box only; bones are painted as a cortical shell
around cancellous marrow. Later structures overwrite earlier ones (painter's order). The
grid and the shape primitives are in :mod:`sct_jax.data.phantom_shapes`.
"""

from __future__ import annotations

import numpy as np

from sct_jax.data.phantom_shapes import (Grid, ellipse_stack, ellipsoid, paint,
                                         rotation_from_axis, smooth_noise)

TISSUE_NAMES = ("air", "fat", "muscle", "fluid", "stool", "marrow", "cortical", "diploe",
                "csf", "grey_matter", "white_matter", "organ")
(AIR, FAT, MUSCLE, FLUID, STOOL, MARROW, CORTICAL, DIPLOE, CSF, GREY_MATTER, WHITE_MATTER,
 ORGAN) = range(len(TISSUE_NAMES))

REFERENCE_FOV_MM = {"pelvis": (256.0, 160.0, 160.0), "brain": (128.0, 160.0, 128.0)}


class Variation:
    """A random generator whose ranged draws stray from their range's middle by a factor.

    ``uniform(low, high)`` returns ``mid + variation * (draw - mid)`` with ``mid = (low +
    high) / 2``: 1 is the full population, 0 the middle anatomy for every case. The
    draws are the wrapped generator's own, one for one, so ``variation=1`` gives the same
    anatomy as the plain generator. ``uniform()`` without a range (a probability: is a
    sinus there, is a loop gas or stool) and ``integers`` (how many loops) pass through:
    registration to an atlas moves and reshapes anatomy, it does not add or remove it.
    """

    def __init__(self, rng: np.random.Generator, variation: float = 1.0):
        self._rng = rng
        self.variation = float(variation)

    def uniform(self, *args, **kwargs):
        draw = self._rng.uniform(*args, **kwargs)
        if not args and not kwargs:
            return draw
        bounds = dict(zip(("low", "high"), args)) | kwargs
        low, high = bounds.get("low", 0.0), bounds.get("high", 1.0)
        mid = 0.5 * (np.asarray(low) + np.asarray(high))
        return mid + self.variation * (draw - mid)

    def __getattr__(self, name):
        return getattr(self._rng, name)


def make_grid(region: str, shape, spacing) -> Grid:
    """The design-mm grid of a ``shape`` volume with voxel ``spacing`` (mm)."""
    fov = np.asarray(shape, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)
    design_per_mm = np.asarray(REFERENCE_FOV_MM[region]) / fov
    axes = [((np.arange(n) - (n - 1) / 2.0) * s * k).astype(np.float32)
            for n, s, k in zip(shape, spacing, design_per_mm)]
    return Grid(*axes, voxel=np.asarray(spacing) * design_per_mm)


class BoneGroup:
    """Bones painted together: the union of their shells is cortical, of their cores marrow.

    Overlapping bones fuse (a shell inside another bone's core becomes marrow), which is
    how the ilium, ischium and pubis join at the acetabulum.
    """

    def __init__(self, grid: Grid, marrow: int = MARROW):
        self.grid = grid
        self.marrow = marrow
        self.outer = np.zeros(grid.shape, dtype=bool)
        self.inner = np.zeros(grid.shape, dtype=bool)

    def _add(self, mask, shape):
        if shape is not None:
            mask[shape[0]] |= shape[1]

    def add_ellipsoid(self, center, radii, cortex, rotation=None, bend=0.0):
        t = self.grid.min_shell(cortex)
        self._add(self.outer, ellipsoid(self.grid, center, radii, rotation, bend))
        inner = np.asarray(radii, dtype=np.float64) - t
        if inner.min() > 0:
            self._add(self.inner, ellipsoid(self.grid, center, inner, rotation, bend))

    def add_segment(self, p0, p1, radius, cortex, flat=1.0):
        """A rod from ``p0`` to ``p1`` (design mm) with rounded ends."""
        p0, p1 = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
        half = np.linalg.norm(p1 - p0) / 2.0 + 0.5 * radius
        self.add_ellipsoid((p0 + p1) / 2.0, (half, radius, radius * flat), cortex,
                           rotation_from_axis(p1 - p0))

    def add_stack(self, z_range, cx, cy, a, b, cortex, angle_deg=0.0, bend=0.0):
        t = self.grid.min_shell(cortex)
        outer = ellipse_stack(self.grid, z_range, cx, cy, a, b, angle_deg=angle_deg, bend=bend)
        self._add(self.outer, None if outer is None else outer[:2])
        shrink = lambda v: (lambda z: (v(z) if callable(v) else v) - t)  # noqa: E731
        inner = ellipse_stack(self.grid, z_range, cx, cy, shrink(a), shrink(b),
                              angle_deg=angle_deg, bend=bend)
        self._add(self.inner, None if inner is None else inner[:2])

    def commit(self, labels: np.ndarray) -> None:
        labels[self.outer] = CORTICAL
        labels[self.inner & self.outer] = self.marrow


def mirrored(fn, *args):
    """Calls ``fn(side, *args)`` for the right (+1) and left (-1) sides."""
    for side in (1.0, -1.0):
        fn(side, *args)


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def build_pelvis(grid: Grid, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A male pelvis from the iliac crests to the proximal femora.

    Args:
      grid: design grid of the pelvis field of view.
      rng: generator for the anatomy (sizes, positions, gas, fat thickness).

    Returns:
      ``(labels, body)``: ``(X, Y, Z)`` uint8 tissue labels and the bool body outline
      (which includes internal gas).
    """
    u = rng.uniform
    labels = np.zeros(grid.shape, dtype=np.uint8)
    z_fh = u(-14.0, -4.0)  # level of the femoral head centres
    half_w, half_front, half_back = u(102, 114), u(62, 70), u(56, 64)
    body_y, power = u(-3.0, 3.0), u(2.3, 2.9)

    def hips(z):  # widest at the greater trochanters
        return half_w * (0.93 + 0.08 * np.exp(-((z - z_fh + 14) / 45) ** 2))

    def front(z):  # the abdomen bulges above the pubis
        return half_front * (1.0 + 0.05 * np.tanh((z - z_fh) / 40))

    everywhere = (-1e4, 1e4)

    def outline(inset_side, inset_front, inset_back, p):
        return ellipse_stack(grid, everywhere, 0.0, body_y, lambda z: hips(z) - inset_side,
                             lambda z: front(z) - inset_front, b_back=half_back - inset_back,
                             power=p)

    body_shape = outline(0, 0, 0, power)
    body = np.zeros(grid.shape, dtype=bool)
    body[body_shape[0]] = body_shape[1]
    skin = grid.min_shell(1.5)
    paint(labels, MUSCLE, body_shape[:2])
    paint(labels, FAT, outline(skin, skin, skin, power)[:2])
    fat_side, fat_front, fat_back = u(8, 20), u(12, 26), u(6, 14)
    paint(labels, MUSCLE, outline(fat_side, fat_front, fat_back, 2.4)[:2])

    # Pelvic cavity: fat around the organs, widening between the iliac wings.
    cavity_y = u(-2.0, 4.0)
    paint(labels, FAT, ellipse_stack(
        grid, (-1e4, z_fh + 70), 0.0, cavity_y,
        lambda z: 30 + 14 * _sigmoid((z - z_fh - 18) / 8),
        lambda z: 30 + 8 * _sigmoid((z - z_fh - 18) / 8))[:2])
    fh_x, fh_y, r_fh = u(54, 60), u(-2.0, 6.0), u(14.0, 17.0)
    mirrored(lambda side: paint(labels, MUSCLE, ellipse_stack(  # psoas
        grid, (z_fh + 12, 1e4), side * u(34, 40), -26.0,
        lambda z: 9 + 5 * _sigmoid((z - z_fh - 40) / 10), 12.0)[:2]))
    _pelvic_organs(grid, rng, labels, z_fh, cavity_y)

    girdle = BoneGroup(grid)
    _sacrum(girdle, z_fh, u)
    mirrored(_hip_bone, girdle, z_fh, fh_x, fh_y, r_fh, u)
    girdle.commit(labels)
    for side in (1.0, -1.0):  # joint space (cartilage) around the femoral heads
        paint(labels, MUSCLE, ellipsoid(grid, (side * fh_x, fh_y, z_fh),
                                        [r_fh + grid.min_shell(1.5)] * 3))
    femora = BoneGroup(grid)
    mirrored(_femur, femora, z_fh, fh_x, fh_y, r_fh, u)
    femora.commit(labels)

    # Intramuscular fat: thin marbling where a smooth field peaks.
    marbling = smooth_noise(rng, grid.shape, 5.0 / grid.voxel)
    labels[(labels == MUSCLE) & (marbling > u(1.8, 2.4))] = FAT
    return labels, body


def _pelvic_organs(grid, rng, labels, z_fh, cavity_y):
    """Bladder, prostate, rectum with gas and a few bowel loops."""
    u = rng.uniform
    wall = grid.min_shell(2.5)
    center = np.array([u(-4, 4), cavity_y + u(10, 16), z_fh + u(4, 14)])
    radii = np.array([u(20, 30), u(14, 20), u(16, 26)])  # how full the bladder is
    paint(labels, MUSCLE, ellipsoid(grid, center, radii + wall))
    paint(labels, FLUID, ellipsoid(grid, center, radii))
    paint(labels, ORGAN, ellipsoid(grid, (center[0], center[1] - 6, center[2] - radii[2] - 10),
                                   (u(11, 14), u(9, 12), u(10, 13))))
    r_rect, gas_level = u(9.0, 12.0), u(0.0, 0.7)
    rect_x = lambda z: 2.5 * np.sin(z / 25 + 1.0)  # noqa: E731

    def rect_y(z):  # follows the sacrum, then turns forward into the anal canal
        return _sacrum_y(z, z_fh) + 9 + r_rect + 10.0 * _sigmoid((z_fh - 35 - z) / 8)

    def rect_r(z):
        return r_rect * (0.55 + 0.45 * _sigmoid((z - z_fh + 40) / 6))

    z_top = z_fh + u(30, 45)
    paint(labels, MUSCLE, ellipse_stack(grid, (-1e4, z_top), rect_x, rect_y, rect_r, rect_r)[:2])
    lumen = ellipse_stack(grid, (-1e4, z_top - wall), rect_x, rect_y,
                          lambda z: rect_r(z) - wall, lambda z: rect_r(z) - wall)
    if lumen is not None:
        sl, inside, local_y = lumen
        collapsed = grid.full(2, sl) < z_fh - 42  # the anal canal is empty
        labels[sl][inside & ~collapsed] = STOOL
        labels[sl][inside & collapsed] = MUSCLE
        # Supine patient: gas rises to the anterior side of the lumen.
        gas = inside & ~collapsed & (local_y > (r_rect - wall) * (1 - 2 * gas_level))
        labels[sl][gas] = AIR
    for _ in range(int(rng.integers(3, 7))):  # small bowel / sigmoid loops above the bladder
        c = np.array([u(-34, 34), u(-8, 26), u(z_fh + 30, 80)])
        r = u(8, 13) * np.array([1.0, u(0.7, 1.0), u(0.8, 1.4)])
        paint(labels, ORGAN, ellipsoid(grid, c, r))
        loop = ellipsoid(grid, c, r - wall)
        if loop is not None:
            sl, inside = loop
            labels[sl][inside] = FLUID if rng.uniform() < 0.5 else STOOL
            gas = inside & (grid.full(1, sl) - c[1] > (r[1] - wall) * (1 - 2 * u(0, 0.6)))
            labels[sl][gas] = AIR


def _sacrum_y(z, z_fh):
    """Centre line of the sacrum: most posterior in its middle (concave anteriorly)."""
    return -34.0 + 8.0 * ((z - z_fh - 30) / 50) ** 2


def _sacrum(bones: BoneGroup, z_fh, u):
    """Sacrum and coccyx: a plate concave anteriorly, wide at the top, tapering down."""
    z_lo, tilt = z_fh - 30, u(-4.0, 4.0)
    bones.add_stack((z_lo, 1e4), 0.0, lambda z: _sacrum_y(z, z_fh) + tilt * (z - z_fh) / 60,
                    lambda z: 6 + 28 * np.clip((z - z_lo) / (90 - z_fh), 0, 1) ** 0.8,
                    lambda z: 7 + 6 * np.clip((z - z_lo) / 60, 0, 1), cortex=1.5, bend=0.008)


def _hip_bone(side, bones: BoneGroup, z_fh, fh_x, fh_y, r_fh, u):
    """Ilium (wing), acetabulum, ischium and pubis of one side."""
    z_crest = z_fh + u(66, 76)
    span = z_crest - z_fh - 14

    def t(z):
        return np.clip((z - z_fh - 14) / span, 0, 1)

    def length(z):  # the wing is longest in mid-height and rounds off at the crest
        tz = t(z)
        crest = np.sqrt(np.clip(1 - ((tz - 0.55) / 0.45).clip(0) ** 2, 0, 1))
        return (16 + 24 * np.minimum(tz / 0.55, 1)) * crest

    angle = u(36, 46)
    bones.add_stack((z_fh + 8, z_crest), lambda z: side * (fh_x - 4 - 6 * t(z)),
                    lambda z: fh_y - 12 - 4 * t(z), length, lambda z: 13 - 7 * np.sqrt(t(z)),
                    cortex=2.0, angle_deg=angle if side > 0 else 180 - angle,
                    bend=side * 0.006)
    # Acetabulum: a cup medial and above the head; the head is carved out later.
    bones.add_ellipsoid((side * (fh_x - 7), fh_y - 2, z_fh + 4),
                        (r_fh + 7, r_fh + 8, r_fh + 10), 2.0)
    # Ischium down to the tuberosity, and the pubic rami meeting at the symphysis.
    ischium_low = (side * (fh_x - 12), fh_y - 16, z_fh - 48)
    bones.add_segment((side * (fh_x - 6), fh_y - 10, z_fh - 6), ischium_low, 10.0, 2.0, flat=1.2)
    symphysis_top = (side * 5.0, fh_y + 36, z_fh - 16)
    symphysis_low = (side * 5.0, fh_y + 32, z_fh - 34)
    bones.add_segment((side * (fh_x - 12), fh_y + 12, z_fh - 4), symphysis_top, 7.0, 1.8)
    bones.add_segment(symphysis_low, ischium_low, 6.5, 1.8)
    bones.add_segment(symphysis_top, symphysis_low, 7.5, 1.8)


def _femur(side, bones: BoneGroup, z_fh, fh_x, fh_y, r_fh, u):
    """Femoral head, neck, greater trochanter and the proximal shaft."""
    head = np.array([side * fh_x, fh_y, z_fh])
    bones.add_ellipsoid(head, [r_fh] * 3, 1.5)
    trochanter = head + (side * u(26, 30), -4.0, -16.0)
    bones.add_segment(head, trochanter, 0.62 * r_fh, 2.0)
    bones.add_ellipsoid(trochanter + (side * 2, -2, 4), (10, 12, 15), 1.5)
    knee_ward = head + (side * u(10, 16), 4.0, -220.0)  # the shaft runs medially down
    bones.add_segment(trochanter + (-side * 8, 1, -6), knee_ward, 10.0, 4.0)


def build_brain(grid: Grid, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A head from the maxillary sinuses to the vertex.

    Layers below the scalp surface follow an approximate distance to an ellipsoid:
    skin, scalp fat, outer table, diploe, inner table, CSF, folded grey matter, white
    matter; the skull base (anterior, middle and posterior fossae) closes the cranium
    from below, with the face underneath.

    Args:
      grid: design grid of the head field of view.
      rng: generator for the anatomy.

    Returns:
      ``(labels, body)``: ``(X, Y, Z)`` uint8 tissue labels and the bool head outline.
    """
    u = rng.uniform
    shape = grid.shape
    centre = np.array([0.0, u(-3.0, 3.0), u(-10.0, -5.0)])
    semi = np.array([u(55, 59), u(70, 75), u(66, 71)])
    X, Y, Z = (grid.full(a) for a in range(3))
    offsets = [X - centre[0], Y - centre[1], Z - centre[2]]
    q = np.sqrt(sum((o / np.float32(s)) ** 2 for o, s in zip(offsets, semi)))
    grad = np.sqrt(sum((o / np.float32(s * s)) ** 2 for o, s in zip(offsets, semi)))
    # First-order distance below the ellipsoidal scalp surface: (1 - q) / |grad q|.
    depth = np.where(grad > 1e-6, (1 - q) * q / np.maximum(grad, 1e-6), semi.min())
    head = depth >= 0

    def surface_y(x, z):  # anterior scalp surface at (x, z)
        return centre[1] + semi[1] * np.sqrt(max(0.0, 1 - (x / semi[0]) ** 2
                                                 - ((z - centre[2]) / semi[2]) ** 2))

    labels = np.zeros(shape, dtype=np.uint8)
    labels[head] = MUSCLE
    t_skin = grid.min_shell(1.5)
    labels[depth > t_skin] = FAT
    outer_table = t_skin + u(2.5, 4.5)
    labels[depth > outer_table] = CORTICAL
    t_outer = grid.min_shell(u(1.5, 2.2))
    labels[depth > outer_table + t_outer] = DIPLOE
    skull_noise = smooth_noise(rng, shape, 15.0 / grid.voxel)
    # The diploe is thicker frontally and occipitally and varies smoothly.
    diploe = (u(2.0, 3.5) * (1 + 0.3 * np.clip(skull_noise, -2, 2))
              * (1 + 0.5 * (offsets[1] / semi[1]) ** 2))
    inner_table = outer_table + t_outer + diploe
    labels[depth > inner_table] = CORTICAL
    t_table = grid.min_shell(u(1.2, 1.8))
    cranial_surface = inner_table + t_table

    # Skull base: anterior fossa highest, posterior fossa lowest, temporal fossae lateral.
    z_mid = u(-31.0, -26.0)
    front = _sigmoid((Y - 15) / 6)
    z_base = (z_mid + 14 * front - 10 * _sigmoid(-(Y + 25) / 6)
              - 5 * np.minimum((X / 35) ** 2, 1) * (1 - front))
    height = Z - z_base
    below = (depth > inner_table) & (height <= 0)
    plate = u(7.0, 10.0)
    labels[below] = MUSCLE
    labels[below & (height > -plate)] = CORTICAL
    labels[below & (height > -plate + t_table) & (height < -t_table)] = DIPLOE

    cranial = (depth > cranial_surface) & (height > 0)
    brain_depth = np.minimum(depth - cranial_surface, height)
    t_csf, t_grey, sulcus_depth = u(1.2, 2.5), u(2.5, 3.5), u(10.0, 15.0)
    # Sulci: the zero set of a smooth field forms folded sheets of CSF lined by cortex.
    fold = np.abs(smooth_noise(rng, shape, 6.0 / grid.voxel))
    in_sulcus_band = brain_depth < t_csf + sulcus_depth
    labels[cranial] = WHITE_MATTER
    labels[cranial & ((brain_depth < t_csf + t_grey)
                      | (in_sulcus_band & (fold < 0.8)))] = GREY_MATTER
    labels[cranial & ((brain_depth < t_csf) | (in_sulcus_band & (fold < 0.15)))] = CSF

    vent_y, vent_z, vent_width = u(-6.0, 4.0), u(4.0, 12.0), u(3.0, 6.5)
    # Interhemispheric fissure down to the corpus callosum, arching over the ventricles.
    fissure = cranial & (Z - vent_z > 14 - 40 * ((Y - vent_y) / 36) ** 4)
    half_gap = grid.min_shell(1.0) / 2
    labels[fissure & (np.abs(X) < half_gap + t_grey) & (labels == WHITE_MATTER)] = GREY_MATTER
    labels[fissure & (np.abs(X) < half_gap)] = CSF
    along_y = rotation_from_axis((0.0, 1.0, 0.0), up=(1.0, 0.0, 0.0))  # local axes y, z, x
    for side in (1.0, -1.0):
        paint(labels, GREY_MATTER, ellipsoid(grid, (side * u(12, 15), vent_y - 4, vent_z - 12),
                                             (8.0, 13.0, 8.0)))  # basal ganglia / thalamus
        paint(labels, CSF, ellipsoid(grid, (side * (vent_width + 2.0), vent_y, vent_z),
                                     (u(22, 27), u(5, 8), vent_width), along_y, bend=-0.012))
    paint(labels, CSF, ellipsoid(grid, (0.0, vent_y - 2, vent_z - 14),
                                 (grid.min_shell(1.5) / 2, 10.0, 7.0)))

    def air_cell(c, r, wall=1.5):  # an air sinus in a bony wall, kept inside the head
        for tissue, radii in ((CORTICAL, np.asarray(r) + grid.min_shell(wall)), (AIR, r)):
            shape_ = ellipsoid(grid, c, radii)
            if shape_ is not None:
                labels[shape_[0]][shape_[1] & head[shape_[0]]] = tissue

    z_front = z_mid + 14 + u(6, 12)
    if rng.uniform() < 0.85:  # frontal sinuses are absent in some people
        air_cell((0.0, surface_y(0.0, z_front) - outer_table - 7, z_front),
                 (u(7, 13), u(3.5, 5.5), u(6, 9)))
    air_cell((0.0, u(5, 12), z_mid - u(8, 11)), (u(10, 13), u(8, 10), u(6, 8)))  # sphenoid
    for side in (1.0, -1.0):
        z_max = z_mid - u(22, 28)
        air_cell((side * u(18, 23), surface_y(20.0, z_max) - 28, z_max), (11.0, 14.0, 13.0))
        z_eye, x_eye = z_mid + 14 - u(8, 12), side * u(26, 31)
        y_eye = surface_y(x_eye, z_eye) - 12
        orbit = ellipsoid(grid, (x_eye, y_eye - 6, z_eye), (16.0, 18.0, 15.0))
        if orbit is not None:
            labels[orbit[0]][orbit[1] & head[orbit[0]]] = CORTICAL
        paint(labels, FAT, ellipsoid(grid, (x_eye, y_eye - 4, z_eye), (14.0, 16.0, 13.0)))
        paint(labels, FLUID, ellipsoid(grid, (x_eye, y_eye, z_eye), [u(10.0, 11.5)] * 3))
    z_nose = z_mid - 22
    nose = ellipsoid(grid, (0.0, surface_y(0.0, z_nose) - 24, z_nose), (6.0, 20.0, 16.0))
    if nose is not None:
        sl, inside = nose
        labels[sl][inside] = AIR
        labels[sl][inside & (np.abs(grid.full(0, sl)) < half_gap)] = ORGAN  # septum
    return labels, head

