"""The embedded `scenes` benchmark: one object on a table with known factors, RGB + depth + mask, three domains.

Scene (world frame in metres: x right, y up, z away from the camera)
    A table top (the plane y = 0, x in [-1, 1], z in [-0.6, 0.9]) pushed against a back wall (the plane
    z = 0.9); beyond the table's sides a floor (y = -0.75). One object stands on the table: a cube, sphere,
    cylinder or cone. A 90-degree sector of the object (the face or wedge that looks at the camera when the
    rotation is 0) is painted in a darker shade of the object's colour, so rotation is visible for the round
    shapes too. One directional light casts a shadow of the object on the table.

Camera
    A perspective pinhole at (0, 1.2, -1.2) looking down at (0, 0, 0.12) with a 36-degree field of view
    (square image). Every pixel is ray-cast in numpy (ray-plane, ray-box in the object frame, ray-sphere,
    ray-cylinder, ray-cone), vectorised over all pixels; sim and pseudo_real colours are 2x2 supersampled,
    depth and mask come from the ray through each pixel centre.

Ground truth
    depth: z-depth in metres (distance along the optical axis). The background is real geometry (wall or
    floor), so depth is finite and > 0 at every pixel; there are no invalid (0) pixels.
    mask: index into SEG_CLASSES = background (wall, floor), table, cube, sphere, cylinder, cone; the
    ignore value 255 is not used.

Factors of variation (integer indices into a discrete grid, in FACTOR_NAMES order)
    shape 4 (cube, sphere, cylinder, cone; also the class label), hue `hues` (>= 12, evenly spaced on the
    colour wheel), size 3, pos_x 8 (left to right on the table), pos_y 8 (near to far on the table),
    rotation 8 (0 to 78.75 degrees about the vertical axis, the cube's 90-degree symmetry period),
    light 4 (directional light from front-left, front-right, back-right, back-left, 50 degrees up).

Domains
    toy (auxiliary): flat colours, no shading; the cast shadow is a flat darker table colour.
    sim (source): Lambert + ambient shading with a specular highlight and a soft cast shadow.
    pseudo_real (target): a SIMULATED stand-in for the user's real data, NOT real data. It is the sim
    rendering with the table texture and background cut from the two real photographs scikit-learn ships
    (china.jpg, flower.jpg; train, val and test crops come from disjoint column bands of the photos),
    seen through a simulated camera: blur, vignetting, white-balance and exposure shifts, shot + read
    noise, JPEG artefacts at a random quality. Replace it with real data to make claims about reality.
"""

from __future__ import annotations

import colorsys
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from s2r.config import SPLITS, ScenesParams
from s2r.data.benchmark import BenchmarkSpec, DomainSpec, Sample

FACTOR_NAMES: tuple[str, ...] = ("shape", "hue", "size", "pos_x", "pos_y", "rotation", "light")
DOMAINS: tuple[str, ...] = ("toy", "sim", "pseudo_real")
CLASSES: tuple[str, ...] = ("cube", "sphere", "cylinder", "cone")
SEG_CLASSES: tuple[str, ...] = ("background", "table") + CLASSES
SEG_BACKGROUND, SEG_TABLE = 0, 1

# Scene geometry (metres).
_TABLE_X = 1.0
_TABLE_Z0 = -0.6
_WALL_Z = 0.9
_FLOOR_Y = -0.75
_CAM = np.array([0.0, 1.2, -1.2])
_LOOK_AT = np.array([0.0, 0.0, 0.12])
_FOV_Y = math.radians(36.0)
_SUPERSAMPLE = 2
_EPS = 1e-6

# Factor grids.
_SIZES = (0.09, 0.115, 0.14)  # object scale s (m); see _object_dims
_POS_X = np.linspace(-0.24, 0.24, 8)
_POS_Z = np.linspace(-0.2, 0.4, 8)
_ROTATIONS = np.deg2rad(np.arange(8) * 11.25)
_LIGHT_AZ = np.deg2rad([-50.0, 50.0, 130.0, -130.0])  # 0 = from the camera side, positive = from the right
_LIGHT_EL = math.radians(50.0)
_FIXED_SIZES = {"shape": 4, "size": 3, "pos_x": 8, "pos_y": 8, "rotation": 8, "light": 4}

# Albedos (display RGB in [0, 1]).
_WALL = np.array([0.80, 0.82, 0.86])
_FLOOR = np.array([0.45, 0.45, 0.50])
_TABLE = np.array([0.62, 0.48, 0.34])
_MARKER_SHADE = 0.55
_TOY_SHADOW = 0.6
_AMBIENT = 0.45

# pseudo_real: column bands of each 640-px-wide sample photo, disjoint between splits.
_PHOTO_BANDS = {"train": (0, 400), "val": (400, 520), "test": (520, 640)}


def factor_sizes(hues: int = 12) -> dict[str, int]:
    """Grid size of every factor, in FACTOR_NAMES order, so BenchmarkSpec.factors and samplers agree."""
    if hues < 1:
        raise ValueError(f"hues must be >= 1, got {hues}")
    return {name: (hues if name == "hue" else _FIXED_SIZES[name]) for name in FACTOR_NAMES}


def sample_factors(rng: np.random.Generator, sizes: dict[str, int]) -> dict[str, int]:
    """Draw one factor setting uniformly from the grid, for training-time sampling of new scenes."""
    return {name: int(rng.integers(n)) for name, n in sizes.items()}


def sample_pair(
    rng: np.random.Generator, sizes: dict[str, int], k: int | None = None
) -> tuple[dict[str, int], dict[str, int], list[str]]:
    """Two settings differing in exactly k factors: the weak supervision of Ada-GVAE (Locatello et al. 2020)."""
    names = [n for n in sizes if sizes[n] > 1]
    if k is None:
        k = int(rng.integers(1, min(len(sizes) - 1, len(names)) + 1))  # uniform on 1..n_factors-1
    if not 1 <= k <= len(names):
        raise ValueError(f"k={k} must be in 1..{len(names)} (factors with more than one value: {names})")
    f1 = sample_factors(rng, sizes)
    changed = set(rng.choice(names, size=k, replace=False).tolist())
    f2 = dict(f1)
    for name in changed:
        f2[name] = int((f1[name] + rng.integers(1, sizes[name])) % sizes[name])
    return f1, f2, [n for n in sizes if n in changed]


def render_scene(
    factors: dict[str, int],
    domain: str,
    image_size: int,
    rng: np.random.Generator,
    hues: int = 12,
    split: str = "train",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one factor setting in one domain -> (rgb uint8 (H,W,3), depth float32 (H,W) m, mask uint8 (H,W))."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown scenes domain {domain!r}; known: {list(DOMAINS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
    geom = _Geometry(_check_factors(factors, hues), hues, _check_size(image_size))
    return _render(geom, domain, rng, split), geom.depth, geom.mask


def generate(params: ScenesParams, seed: int) -> tuple[BenchmarkSpec, Iterator[Sample]]:
    """Describe the scenes benchmark and lazily render every factor setting in every domain."""
    params.validate()
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    sizes = factor_sizes(params.hues)
    spec = BenchmarkSpec(
        name="scenes",
        tasks=["factors", "depth", "segmentation", "classification"],
        domains=[
            DomainSpec("toy", "auxiliary", "flat-coloured renderings of the scenes, no shading"),
            DomainSpec("sim", "source", "shaded renderings (Lambert + ambient + specular, soft cast shadow)"),
            DomainSpec(
                "pseudo_real",
                "target",
                "SIMULATED stand-in for the user's real data, NOT real data: the sim rendering with table and "
                "background textures cut from scikit-learn's two sample photographs (disjoint regions per "
                "split) and a simulated camera (blur, vignetting, white balance/exposure shifts, shot + read "
                "noise, JPEG artefacts)",
                labelled=True,  # labels exist for evaluation and upper-bound baselines
                simulated_real=True,
            ),
        ],
        source="sim",
        target="pseudo_real",
        image_size=params.image_size,
        channels=3,
        classes=list(CLASSES),
        factors=sizes,
        seg_classes=list(SEG_CLASSES),
        has_depth=True,
        has_mask=True,
        description=(
            "Procedurally ray-cast objects (cube, sphere, cylinder, cone) on a table with known factors of "
            "variation (shape, hue, size, position, rotation, light), RGB + z-depth (m) + segmentation mask. "
            "The target domain pseudo_real is simulated, not real data."
        ),
    )
    spec.validate()
    settings = _distinct_settings(seed, sizes, [params.samples[s] for s in SPLITS])
    return spec, _samples(params, seed, settings)


def _samples(params: ScenesParams, seed: int, settings: list[dict[str, int]]) -> Iterator[Sample]:
    """Yield each setting rendered in every domain; geometry is cast once and shared by the domains."""
    scene_id = 0
    for si, split in enumerate(SPLITS):
        for i in range(params.samples[split]):
            factors = settings[scene_id]
            geom = _Geometry(factors, params.hues, params.image_size)
            for di, domain in enumerate(DOMAINS):
                rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, si, i, di)))
                yield Sample(
                    id=f"{domain}-{split}-{i:05d}",
                    domain=domain,
                    split=split,
                    image=_render(geom, domain, rng, split),
                    label=factors["shape"],
                    factors=dict(factors),
                    depth=geom.depth.copy(),
                    mask=geom.mask.copy(),
                    scene_id=scene_id,
                    variation=di,
                )
            scene_id += 1


def _distinct_settings(seed: int, sizes: dict[str, int], counts: list[int]) -> list[dict[str, int]]:
    """Distinct factor settings for all splits, so no image of a deterministic domain repeats across splits."""
    total = math.prod(sizes.values())
    n = sum(counts)
    if n > total:
        raise ValueError(f"scenes: {n} samples requested but the factor grid has only {total} settings")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    flat = rng.choice(total, size=n, replace=False)
    idx = np.unravel_index(flat, tuple(sizes.values()))  # flat grid index -> one index array per factor
    return [{name: int(idx[j][s]) for j, name in enumerate(sizes)} for s in range(n)]


def _check_factors(factors: dict[str, int], hues: int) -> dict[str, int]:
    sizes = factor_sizes(hues)
    missing = [n for n in FACTOR_NAMES if n not in factors]
    if missing:
        raise ValueError(f"factors {factors} lack {missing}; expected all of {list(FACTOR_NAMES)}")
    for name, n in sizes.items():
        if not 0 <= int(factors[name]) < n:
            raise ValueError(f"factor {name!r}={factors[name]} out of range 0..{n - 1}")
    return {n: int(factors[n]) for n in FACTOR_NAMES}


def _check_size(image_size: int) -> int:
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    return int(image_size)


# ---------------------------------------------------------------------------------------------------------
# Ray casting


@lru_cache(maxsize=8)
def _ray_dirs(m: int) -> np.ndarray:
    """Per-pixel ray directions (m*m, 3), scaled so d . forward = 1 and hit distance t is z-depth."""
    fwd = _LOOK_AT - _CAM
    fwd = fwd / np.linalg.norm(fwd)
    right = np.cross(np.array([0.0, 1.0, 0.0]), fwd)
    right /= np.linalg.norm(right)
    up = np.cross(fwd, right)
    c = ((np.arange(m) + 0.5) / m * 2.0 - 1.0) * math.tan(_FOV_Y / 2)
    d = fwd + c[None, :, None] * right - c[:, None, None] * up  # (m, m, 3): rows top->bottom
    d = d.reshape(m * m, 3)  # (m, m, 3) -> (m*m, 3)
    d.flags.writeable = False
    out: np.ndarray = d
    return out


def _light_dir(light: int) -> np.ndarray:
    az = _LIGHT_AZ[light]
    return np.array(
        [math.cos(_LIGHT_EL) * math.sin(az), math.sin(_LIGHT_EL), -math.cos(_LIGHT_EL) * math.cos(az)]
    )


def _rot_y(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _object_dims(shape: int, s: float) -> tuple[float, float]:
    """(radius or half-width, height) of each shape, tuned so the four look about equally big."""
    return [(0.85 * s, 1.7 * s), (1.0 * s, 2.0 * s), (0.85 * s, 1.9 * s), (1.05 * s, 2.4 * s)][shape]


def _nosmall(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < 1e-12, 1e-12, x)


def _hit_box(o: np.ndarray, d: np.ndarray, a: float, h: float) -> tuple[np.ndarray, np.ndarray]:
    """Slab test against [-a,a] x [0,h] x [-a,a]; returns (t, object-frame normal), t = inf on a miss."""
    lo, hi = np.array([-a, 0.0, -a]), np.array([a, h, a])
    dd = _nosmall(d)
    t1, t2 = (lo - o) / dd, (hi - o) / dd
    tn = np.minimum(t1, t2)
    t_near, t_far = tn.max(-1), np.maximum(t1, t2).min(-1)
    hit = (t_far >= t_near) & (t_near > _EPS)
    axis = tn.argmax(-1)
    normal = np.zeros(tn.shape)
    rows = np.arange(tn.shape[0])
    normal[rows, axis] = -np.sign(np.broadcast_to(dd, tn.shape)[rows, axis])
    return np.where(hit, t_near, np.inf), normal


def _hit_sphere(o: np.ndarray, d: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    oc = o - np.array([0.0, r, 0.0])
    a = (d * d).sum(-1)
    b = 2.0 * (d * oc).sum(-1)
    c = (oc * oc).sum(-1) - r * r
    disc = b * b - 4 * a * c
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2 * a)
    t = np.where((disc >= 0) & (t > _EPS), t, np.inf)
    p = oc + np.where(np.isfinite(t), t, 0.0)[:, None] * d
    return t, p / r


def _hit_cylinder(o: np.ndarray, d: np.ndarray, r: float, h: float) -> tuple[np.ndarray, np.ndarray]:
    ox, oy, oz = o[..., 0], o[..., 1], o[..., 2]
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    a = _nosmall(dx * dx + dz * dz)
    b = 2.0 * (ox * dx + oz * dz)
    c = ox * ox + oz * oz - r * r
    disc = b * b - 4 * a * c
    t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2 * a)
    y = oy + t_side * dy
    t_side = np.where((disc >= 0) & (t_side > _EPS) & (y >= 0) & (y <= h), t_side, np.inf)
    t_cap = (h - oy) / _nosmall(dy)
    cx, cz = ox + t_cap * dx, oz + t_cap * dz
    t_cap = np.where((t_cap > _EPS) & (cx * cx + cz * cz <= r * r), t_cap, np.inf)
    t = np.minimum(t_side, t_cap)
    tt = np.where(np.isfinite(t), t, 0.0)
    px, pz = ox + tt * dx, oz + tt * dz
    side = np.stack([px / r, np.zeros_like(px), pz / r], -1)
    normal = np.where((t_cap <= t_side)[:, None], np.array([0.0, 1.0, 0.0]), side)
    return t, normal


def _hit_cone(o: np.ndarray, d: np.ndarray, r: float, h: float) -> tuple[np.ndarray, np.ndarray]:
    """Cone with apex (0,h,0) and base radius r at y=0: x^2 + z^2 = (r/h)^2 (h-y)^2, 0 <= y <= h."""
    ox, oy, oz = o[..., 0], o[..., 1], o[..., 2]
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    k2 = (r / h) ** 2
    y0 = h - oy
    a = _nosmall(dx * dx + dz * dz - k2 * dy * dy)
    b = 2.0 * (ox * dx + oz * dz + k2 * y0 * dy)
    c = ox * ox + oz * oz - k2 * y0 * y0
    disc = b * b - 4 * a * c
    sq = np.sqrt(np.maximum(disc, 0.0))
    t = np.full(np.broadcast(a, b).shape, np.inf)
    for root in ((-b - sq) / (2 * a), (-b + sq) / (2 * a)):
        y = oy + root * dy
        ok = (disc >= 0) & (root > _EPS) & (y >= 0) & (y <= h)
        t = np.where(ok & (root < t), root, t)
    tt = np.where(np.isfinite(t), t, 0.0)
    px, py, pz = ox + tt * dx, oy + tt * dy, oz + tt * dz
    n = np.stack([px, k2 * (h - py), pz], -1)  # gradient of x^2 + z^2 - k2 (h-y)^2, halved
    n /= np.linalg.norm(n, axis=-1, keepdims=True) + 1e-12
    return t, n


def _hit_object(
    shape: int, o: np.ndarray, d: np.ndarray, r: float, h: float
) -> tuple[np.ndarray, np.ndarray]:
    if shape == 0:
        return _hit_box(o, d, r, h)
    if shape == 1:
        return _hit_sphere(o, d, r)
    if shape == 2:
        return _hit_cylinder(o, d, r, h)
    return _hit_cone(o, d, r, h)


@dataclass
class _Hits:
    """What the rays through an (m, m) pixel grid hit; all arrays are flat over the m*m pixels."""

    m: int
    seg: np.ndarray  # (P,) uint8 SEG_CLASSES index
    t: np.ndarray  # (P,) z-depth (m)
    normal: np.ndarray  # (P, 3) world normal at the hit
    point: np.ndarray  # (P, 3) world hit point
    marker: np.ndarray  # (P,) bool: the darker painted sector of the object
    shadow: np.ndarray  # (P,) bool: table point in the object's cast shadow (also under the object)
    floor: np.ndarray  # (P,) bool: background pixel on the floor rather than the wall


@lru_cache(maxsize=8)
def _static_scene(m: int) -> tuple[np.ndarray, ...]:
    """Wall, floor and table hits of the (m, m) grid (the same for every scene): t, seg, normal, floor, table."""
    d = _ray_dirs(m)
    dy = _nosmall(d[:, 1])
    t_wall = (_WALL_Z - _CAM[2]) / d[:, 2]  # every ray looks forward (d_z > 0)
    t_floor = np.where(dy < 0, (_FLOOR_Y - _CAM[1]) / dy, np.inf)
    floor = t_floor < t_wall
    t = np.minimum(t_wall, t_floor)
    t_tab = np.where(dy < 0, -_CAM[1] / dy, np.inf)
    p_tab = _CAM + np.where(np.isfinite(t_tab), t_tab, 0.0)[:, None] * d
    table = (
        np.isfinite(t_tab)
        & (np.abs(p_tab[:, 0]) <= _TABLE_X)
        & (p_tab[:, 2] >= _TABLE_Z0)
        & (p_tab[:, 2] <= _WALL_Z)
    )
    t = np.where(table, t_tab, t)
    floor &= ~table
    normal = np.where((floor | table)[:, None], np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0]))
    seg = np.where(table, SEG_TABLE, SEG_BACKGROUND).astype(np.uint8)
    out = (t, seg, normal, floor, table)
    for a in out:
        a.flags.writeable = False
    return out


def _bounding_hits(o: np.ndarray, d: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    """Rays (o + t d, t > 0) that meet the object's bounding sphere: the only ones worth an exact test."""
    oc = o - centre
    a = (d * d).sum(-1)
    b = (d * oc).sum(-1)
    c = (oc * oc).sum(-1) - radius * radius
    out: np.ndarray = (b * b - a * c >= 0) & ((b <= 0) | (c <= 0))
    return out


def _cast(factors: dict[str, int], m: int) -> _Hits:
    """Ray-cast the scene for an (m, m) grid of pixel-centre rays; the object is tested only where it may be."""
    d = _ray_dirs(m)
    t0, seg0, normal0, floor0, table = _static_scene(m)
    t, seg, normal = t0.copy(), seg0.copy(), normal0.copy()

    shape = factors["shape"]
    r, h = _object_dims(shape, _SIZES[factors["size"]])
    base = np.array([_POS_X[factors["pos_x"]], 0.0, _POS_Z[factors["pos_y"]]])
    rot = _rot_y(float(_ROTATIONS[factors["rotation"]]))  # object -> world
    centre = base + np.array([0.0, h / 2, 0.0])
    radius = 1.01 * math.hypot(r * (math.sqrt(2.0) if shape == 0 else 1.0), h / 2)
    # Row vectors: world -> object frame is v @ rot, object -> world is v @ rot.T.
    cand = np.flatnonzero(_bounding_hits(_CAM, d, centre, radius))
    t_obj, n_obj = _hit_object(shape, (_CAM - base) @ rot, d[cand] @ rot, r, h)
    front = t_obj < t[cand]
    obj = cand[front]
    t[obj] = t_obj[front]
    normal[obj] = n_obj[front] @ rot.T
    seg[obj] = SEG_TABLE + 1 + shape
    point = _CAM + t[:, None] * d
    q = (point[obj] - base) @ rot  # object-frame hit points
    marker = np.zeros(m * m, bool)
    marker[obj] = np.abs(np.arctan2(q[:, 0], -q[:, 2])) < math.pi / 4
    floor = floor0.copy()
    floor[obj] = False

    # Shadow rays towards the light from table-plane points (visible or hidden behind the object).
    light = _light_dir(factors["light"])
    p_tab = _CAM + (-_CAM[1] / _nosmall(d[:, 1]))[:, None] * d
    near = table & _bounding_hits(p_tab, light, centre, radius)
    idx = np.flatnonzero(near)
    shadow = np.zeros(m * m, bool)
    if idx.size:
        qt = (p_tab[idx] - base) @ rot
        t_sh, _ = _hit_object(shape, qt, light @ rot, r, h)
        if shape == 0:
            inside = (np.abs(qt[:, 0]) <= r) & (np.abs(qt[:, 2]) <= r)
        else:
            inside = qt[:, 0] ** 2 + qt[:, 2] ** 2 <= (0.0 if shape == 1 else r * r)
        shadow[idx] = np.isfinite(t_sh) | inside
    return _Hits(m, seg, t, normal, point, marker, shadow, floor)


class _Geometry:
    """One factor setting; casts its rays lazily and shares them between the domains."""

    def __init__(self, factors: dict[str, int], hues: int, size: int) -> None:
        self.factors, self.hues, self.size = factors, hues, size

    @cached_property
    def coarse(self) -> _Hits:
        return _cast(self.factors, self.size)

    @cached_property
    def fine(self) -> _Hits:
        return _cast(self.factors, self.size * _SUPERSAMPLE)

    @cached_property
    def depth(self) -> np.ndarray:
        return self.coarse.t.reshape(self.size, self.size).astype(np.float32)  # (P,) -> (H, W)

    @cached_property
    def mask(self) -> np.ndarray:
        return self.coarse.seg.reshape(self.size, self.size)  # (P,) -> (H, W)

    @cached_property
    def lighting(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _lighting(self)

    @cached_property
    def colour(self) -> np.ndarray:
        h = self.factors["hue"] / self.hues
        return np.array(colorsys.hsv_to_rgb(h, 0.85, 0.92))


# ---------------------------------------------------------------------------------------------------------
# Shading and the simulated camera


def _render(geom: _Geometry, domain: str, rng: np.random.Generator, split: str) -> np.ndarray:
    if domain == "toy":
        return _to_uint8(_shade_toy(geom))
    if domain == "sim":
        return _to_uint8(_downsample(_shade_lit(geom, None, None), geom.size))
    table_tex, backdrop = _photo_crop(rng, split), _photo_crop(rng, split)
    rgb = _downsample(_shade_lit(geom, table_tex, backdrop), geom.size)
    return _camera(rgb, rng)


def _albedo(geom: _Geometry, hits: _Hits) -> np.ndarray:
    """Per-pixel flat colour (P, 3) of the wall, floor, table and object."""
    alb = np.where(hits.floor[:, None], _FLOOR, _WALL)
    alb = np.where((hits.seg == SEG_TABLE)[:, None], _TABLE, alb)
    obj = hits.seg > SEG_TABLE
    colour = np.where(hits.marker[:, None], _MARKER_SHADE * geom.colour, geom.colour)
    return np.where(obj[:, None], colour, alb)


def _shade_toy(geom: _Geometry) -> np.ndarray:
    """Flat colours at pixel centres (no anti-aliasing, no shading); the shadow is a flat darker table."""
    hits = geom.coarse
    alb = _albedo(geom, hits)
    alb = np.where((hits.shadow & (hits.seg == SEG_TABLE))[:, None], _TOY_SHADOW * alb, alb)
    return alb.reshape(geom.size, geom.size, 3)  # (P, 3) -> (H, W, 3)


def _lighting(geom: _Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fine-grid (albedo (P, 3), irradiance (P,), specular (P,)): Lambert + ambient, soft shadow, Blinn-Phong."""
    hits, m = geom.fine, geom.fine.m
    light = _light_dir(geom.factors["light"])
    table = hits.seg == SEG_TABLE
    shadow = _blur(hits.shadow.reshape(m, m).astype(float), 0.012 * m).reshape(-1)  # (m, m) -> (P,)
    shadow = np.where(table, shadow, 0.0)
    ndl = np.clip(hits.normal @ light, 0.0, 1.0)
    irradiance = _AMBIENT + (1 - _AMBIENT) * ndl * (1 - 0.85 * shadow)
    view = _CAM - hits.point
    half = light + view / np.linalg.norm(view, axis=1, keepdims=True)
    half /= np.linalg.norm(half, axis=1, keepdims=True)
    spec = 0.3 * np.clip((hits.normal * half).sum(1), 0.0, 1.0) ** 40
    return _albedo(geom, hits), irradiance, np.where(hits.seg > SEG_TABLE, spec, 0.0)


def _shade_lit(geom: _Geometry, table_tex: np.ndarray | None, backdrop: np.ndarray | None) -> np.ndarray:
    """Shaded (m, m, 3) fine-grid image; pseudo_real passes photo crops for the table and the background."""
    hits, m = geom.fine, geom.fine.m
    alb, irradiance, spec = geom.lighting
    if table_tex is not None:
        th, tw = table_tex.shape[:2]
        u = (hits.point[:, 0] + _TABLE_X) / (2 * _TABLE_X)
        v = (_WALL_Z - hits.point[:, 2]) / (_WALL_Z - _TABLE_Z0)
        ui = np.clip((u * tw).astype(int), 0, tw - 1)
        vi = np.clip((v * th).astype(int), 0, th - 1)
        alb = np.where((hits.seg == SEG_TABLE)[:, None], 0.25 * _TABLE + 0.75 * table_tex[vi, ui], alb)
    lit = alb * irradiance[:, None] + spec[:, None]
    if backdrop is not None:
        bg = _resize(backdrop, m).reshape(-1, 3)  # (m, m, 3) -> (P, 3)
        lit = np.where((hits.seg == SEG_BACKGROUND)[:, None], 0.9 * bg, lit)
    out: np.ndarray = lit.reshape(m, m, 3)  # (P, 3) -> (m, m, 3)
    return out


def _downsample(img: np.ndarray, n: int) -> np.ndarray:
    f = img.shape[0] // n
    out: np.ndarray = img.reshape(n, f, n, f, 3).mean(axis=(1, 3))  # (n*f, n*f, 3) -> (n, f, n, f, 3) -> (n, n, 3)
    return out


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W) or (H, W, C) float image with edge padding."""
    if sigma < 0.25:
        return img
    r = max(1, math.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    h, w = img.shape[:2]
    extra = [(0, 0)] * (img.ndim - 2)
    p = np.pad(img, [(r, r), (0, 0)] + extra, mode="edge")
    img = sum(k[i] * p[i : i + h] for i in range(2 * r + 1))
    p = np.pad(img, [(0, 0), (r, r)] + extra, mode="edge")
    out: np.ndarray = sum(k[i] * p[:, i : i + w] for i in range(2 * r + 1))
    return out


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """scikit-learn's two bundled real photographs (china.jpg, flower.jpg), (427, 640, 3) uint8 each."""
    from sklearn.datasets import load_sample_images

    images = tuple(np.asarray(im, dtype=np.uint8) for im in load_sample_images().images)
    for im in images:
        im.flags.writeable = False
    return images


def _photo_crop(rng: np.random.Generator, split: str) -> np.ndarray:
    """A random square crop (float in [0,1]) from this split's column band of a sample photo."""
    photo = _photos()[int(rng.integers(2))]
    lo, hi = _PHOTO_BANDS[split]
    hi = min(hi, photo.shape[1])
    side = int(rng.integers(min(64, hi - lo), min(120, hi - lo, photo.shape[0]) + 1))
    x0 = int(rng.integers(lo, hi - side + 1))
    y0 = int(rng.integers(0, photo.shape[0] - side + 1))
    crop = photo[y0 : y0 + side, x0 : x0 + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop.transpose(1, 0, 2)  # (H, W, 3) -> (W, H, 3)
    return crop.astype(np.float32) / 255.0


def _resize(img: np.ndarray, m: int) -> np.ndarray:
    from PIL import Image

    out = Image.fromarray(_to_uint8(img)).resize((m, m), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float32) / 255.0


def _camera(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Simulate a real camera on a float (H, W, 3) image: optics, exposure, sensor noise, JPEG -> uint8."""
    from PIL import Image

    n = rgb.shape[0]
    img = _blur(rgb, rng.uniform(0.3, 1.0) * n / 64)
    yy, xx = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    img = img * (1.0 - rng.uniform(0.1, 0.4) * (xx**2 + yy**2) / 2)[..., None]
    gains = np.exp(rng.normal(0.0, 0.08, 3)) * 2.0 ** rng.uniform(-0.5, 0.4)
    img = img * gains
    photons = rng.uniform(150.0, 1000.0)  # photo-electrons at full scale: lower = noisier
    read = rng.uniform(0.004, 0.02)
    shot = np.sqrt(np.clip(img, 0.0, None) / photons)
    img = img + shot * rng.standard_normal(img.shape) + read * rng.standard_normal(img.shape)
    buf = io.BytesIO()
    Image.fromarray(_to_uint8(img)).save(buf, format="JPEG", quality=int(rng.integers(30, 91)))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.uint8)
