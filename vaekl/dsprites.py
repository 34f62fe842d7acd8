"""dSprites-like images rendered on the device, and ground-truth-factor datasets.

**dSprites-like, not pixel-identical.** The original dSprites (Matthey et al.,
2017; ``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz``) was drawn by another
renderer; here the same factor grid is rendered analytically, so no download is
needed and batches are drawn inside the compiled training loop. The original
file itself can be used through :class:`ArrayGroundTruth` (:func:`load_npz`).

Factor grid (as the original; flat index with posY fastest, i.e.
``index = Σ factor_index × [245760, 40960, 1024, 32, 1]``):

  ======  ===========  ==================================================
  factor  size         values
  ======  ===========  ==================================================
  shape   3            square, ellipse, heart
  scale   6            linspace(0.5, 1, 6)
  orient  40           linspace(0, 2π, 40) radians (index 0 and 39 are the
                       same angle mod 2π and render identically)
  posX    32           linspace(0, 1, 32)
  posY    32           linspace(0, 1, 32)
  ======  ===========  ==================================================

Rendering choices (stated, since the original's renderer is not reproduced):
the frame is 64×64 pixels with pixel centres at (j + ½, i + ½) for column j,
row i. A shape's centre is at ``64 (0.2 + 0.6 pos)`` pixels, i.e. centres span
[0.2, 0.8] of the frame; posX moves it right (columns), posY down (rows). Each
pixel centre is mapped to shape coordinates (u right, v up) by the inverse
translation, rotation (counter-clockwise on screen by the orientation) and scale
(``HALF_SIZE × scale`` pixels per unit, HALF_SIZE = 8, so a square at scale 1 is
16 px wide: 1/4 of the frame), and is lit when it lies in the unit shape:

  * square: max(|u|, |v|) ≤ 1 (area 4 units²);
  * ellipse: u² + (v / 0.5)² ≤ 1, axis ratio 2 : 1 (area π/2);
  * heart: (a² + b² − 1)³ ≤ a² b³ with a = 1.15 u, b = 1.15 v + 0.12 (the
    classic implicit heart, point down, box ≈ [−0.99, 0.99]², area ≈ 2.77).

Every shape lies within radius √2 of its centre (the square's corners), i.e.
11.3 px at scale 1, so at the extreme centres (12.8 px from the border) no
shape reaches the border pixels.

Variants (as disentanglement_lib's ``ColorDSprites`` / ``NoisyDSprites``), RGB:

  * ``"dsprites_color"``: the shape times a colour drawn uniformly from
    [0.5, 1]³ per image; black background. The colour is not a factor.
  * ``"dsprites_noisy"``: white shape (1, 1, 1) on a background of uniform
    noise in [0, 1]³ drawn per pixel.

Images are uint8 in 0..255 ({0, 255} for plain dSprites); colours are quantized
as round(255 c), noise is drawn uniformly over the 256 levels 0..255 (U[0, 1] on
8 bits). Observations of the ground-truth interface are these images / 255 as
float32, i.e. exactly what the trainer sees with ``binarization="none"``.

The ground-truth interface (as disentanglement_lib's ``GroundTruthData``):
``factor_names``, ``factor_sizes``, ``num_factors``, ``observation_shape``,
``sample_factors(n, rng)``, ``sample_observations_from_factors(factors, rng)``,
``sample(n, rng)``, plus ``index_to_factors`` / ``factors_to_index`` and
``batch_source()`` (the on-device training batch source, see
:meth:`GroundTruthData.batch_source`). ``rng`` is a ``numpy.random.Generator``.
"""

from __future__ import annotations

import abc
import functools
import math
import os
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FACTOR_NAMES",
    "FACTOR_SIZES",
    "SHAPES",
    "VARIANTS",
    "ArrayGroundTruth",
    "DSprites",
    "GroundTruthData",
    "factor_strides",
    "factor_values",
    "load_npz",
    "observe",
    "read_npz",
    "render",
    "render_numpy",
    "render_values",
    "sample_factor_indices",
]

FACTOR_NAMES = ("shape", "scale", "orientation", "posX", "posY")
FACTOR_SIZES = (3, 6, 40, 32, 32)
SHAPES = ("square", "ellipse", "heart")
VARIANTS = {"dsprites": 1, "dsprites_color": 3, "dsprites_noisy": 3}  # name -> channels

IMAGE_SIZE = 64  # pixels, square frame
HALF_SIZE = 8.0  # pixels per shape unit at scale 1 (square half-width)
CENTRE_MIN, CENTRE_SPAN = 0.2, 0.6  # centres at IMAGE_SIZE (CENTRE_MIN + CENTRE_SPAN pos)
ELLIPSE_RATIO = 0.5  # minor / major semi-axis
HEART_SCALE, HEART_SHIFT = 1.15, 0.12  # heart curve coordinates a = 1.15 u, b = 1.15 v + 0.12

_CHUNK = 1024  # images per jitted call when rendering on the host's behalf


def factor_values() -> tuple[np.ndarray, ...]:
    """The factor values of the grid, float64: (shape index, scale, angle (rad), posX, posY)."""
    return (np.arange(3.0), np.linspace(0.5, 1, 6), np.linspace(0, 2 * np.pi, 40),
            np.linspace(0, 1, 32), np.linspace(0, 1, 32))


def factor_strides(factor_sizes) -> np.ndarray:
    """Flat-index strides, last factor fastest: int64 [F]; (245760, 40960, 1024, 32, 1) for dSprites."""
    sizes = np.asarray(factor_sizes, np.int64)
    return np.concatenate([np.cumprod(sizes[::-1])[::-1][1:], [1]]).astype(np.int64)


# --------------------------------------------------------------------------------------
# On-device rendering (pure JAX, jittable; no per-image Python loops).


def _inside(shape: jax.Array, u: jax.Array, v: jax.Array) -> jax.Array:
    """Membership of shape coordinates (u, v) in shape index ``shape`` (broadcasts)."""
    square = jnp.maximum(jnp.abs(u), jnp.abs(v)) <= 1.0
    w = v / ELLIPSE_RATIO
    ellipse = u * u + w * w <= 1.0
    a = HEART_SCALE * u
    b = HEART_SCALE * v + HEART_SHIFT
    r = a * a + b * b - 1.0
    heart = r * r * r <= a * a * b * b * b
    return jnp.where(shape == 0, square, jnp.where(shape == 1, ellipse, heart))


def render_values(shape: jax.Array, scale: jax.Array, angle: jax.Array, pos_x: jax.Array,
                  pos_y: jax.Array) -> jax.Array:
    """Renders shapes from factor values (not indices).

    Args:
      shape: int [B], 0 square, 1 ellipse, 2 heart.
      scale: float [B], linear size (1 = 16 px square).
      angle: float [B], radians, counter-clockwise on screen; taken mod 2π.
      pos_x, pos_y: float [B] in [0, 1]; centres at 64 (0.2 + 0.6 pos) px.

    Returns:
      uint8 [B, 64, 64, 1] in {0, 255}.
    """
    f32 = jnp.float32
    angle = jnp.mod(jnp.asarray(angle, f32), f32(2 * np.pi))
    pix = jnp.arange(IMAGE_SIZE, dtype=f32) + 0.5  # pixel centres
    cx = IMAGE_SIZE * (CENTRE_MIN + CENTRE_SPAN * jnp.asarray(pos_x, f32))
    cy = IMAGE_SIZE * (CENTRE_MIN + CENTRE_SPAN * jnp.asarray(pos_y, f32))
    dx = pix[None, None, :] - cx[:, None, None]  # [B, 1, W], rightwards
    dy = cy[:, None, None] - pix[None, :, None]  # [B, H, 1], upwards
    c = jnp.cos(angle)[:, None, None]
    s = jnp.sin(angle)[:, None, None]
    inv = 1.0 / (HALF_SIZE * jnp.asarray(scale, f32))[:, None, None]
    u = (c * dx + s * dy) * inv  # inverse rotation, then inverse scale
    v = (c * dy - s * dx) * inv
    inside = _inside(jnp.asarray(shape)[:, None, None], u, v)
    return jnp.where(inside, jnp.uint8(255), jnp.uint8(0))[..., None]


_TABLES = tuple(np.asarray(t, np.float32) for t in factor_values()[1:])  # scale, angle, posX, posY


@jax.jit
def render(factor_indices: jax.Array) -> jax.Array:
    """Renders dSprites from factor indices int [B, 5] -> uint8 [B, 64, 64, 1] in {0, 255}."""
    idx = jnp.asarray(factor_indices, jnp.int32)
    scale, angle, pos_x, pos_y = (jnp.asarray(t)[idx[:, i + 1]] for i, t in enumerate(_TABLES))
    return render_values(idx[:, 0], scale, angle, pos_x, pos_y)


def _to_uint8(x: jax.Array) -> jax.Array:
    """[0, 1] -> uint8 round(255 x)."""
    return jnp.round(x * 255.0).astype(jnp.uint8)


def observe(key: jax.Array | None, factor_indices: jax.Array, variant: str = "dsprites") -> jax.Array:
    """Images of factor indices int [B, 5] for a ``variant`` of :data:`VARIANTS` (static).

    Returns:
      uint8 [B, 64, 64, C]: C = 1 for "dsprites" ({0, 255}; ``key`` unused),
      C = 3 for "dsprites_color" (shape × U[0.5, 1]³ colour per image, as
      round(255 c)) and "dsprites_noisy" (white shape on noise per pixel and
      channel, uniform over the 256 levels 0..255, i.e. U[0, 1] on 8 bits).
    """
    mask = render(factor_indices)
    if variant == "dsprites":
        return mask
    if variant not in VARIANTS:
        raise ValueError(f"observe: unknown variant {variant!r}; expected one of {tuple(VARIANTS)}.")
    if key is None:
        raise ValueError(f"observe: variant {variant!r} needs a PRNG key.")
    # RGB pixels are built as uint32 words of 4 i.i.d. random bytes and bitcast to
    # bytes, of which 3 are kept: whatever the byte order, the 3 channels are i.i.d.
    # (XLA on CPU is ~10x slower writing a minor axis of 3 directly.)
    inside = mask[..., 0] > 0  # [B, H, W]
    b = mask.shape[0]
    if variant == "dsprites_color":
        levels = _to_uint8(jax.random.uniform(key, (b, 4), minval=0.5, maxval=1.0)).astype(jnp.uint32)
        colour = levels[:, 0] | levels[:, 1] << 8 | levels[:, 2] << 16 | levels[:, 3] << 24
        words = jnp.where(inside, colour[:, None, None], jnp.uint32(0))
    else:
        noise = jax.random.bits(key, (b, IMAGE_SIZE, IMAGE_SIZE), jnp.uint32)
        words = jnp.where(inside, jnp.uint32(0xFFFFFFFF), noise)
    return jax.lax.bitcast_convert_type(words, jnp.uint8)[..., :3]


def sample_factor_indices(key: jax.Array, batch: int) -> jax.Array:
    """Factor indices drawn uniformly over the grid: int32 [batch, 5] (``batch`` static)."""
    return jax.random.randint(key, (batch, len(FACTOR_SIZES)), 0,
                              jnp.asarray(FACTOR_SIZES, jnp.int32), dtype=jnp.int32)


def _draw_rendered(key: jax.Array, device_arrays: tuple, batch_size: int, *, variant: str) -> jax.Array:
    """A training batch: uniform factors, rendered; uint8 [B, 64, 64, C]."""
    del device_arrays  # nothing to hold on the device
    k_factors, k_obs = jax.random.split(key)
    return observe(k_obs, sample_factor_indices(k_factors, batch_size), variant)


# One function object per variant, so that a trainer passing `draw` as a static
# argument compiles once.
_DRAW = {v: functools.partial(_draw_rendered, variant=v) for v in VARIANTS}
_observe_jit = jax.jit(observe, static_argnames="variant")


# --------------------------------------------------------------------------------------
# Host-side reference (NumPy, float64; written independently of the JAX renderer).


def render_numpy(factors: np.ndarray) -> np.ndarray:
    """Reference renderer on the host: factor indices int [B, 5] -> uint8 [B, 64, 64, 1].

    An explicit loop over images in float64 with a rotation matrix, for tests of
    :func:`render`; the two may differ only on pixels whose centre lies on a
    shape's boundary up to float32 rounding.
    """
    factors = np.asarray(factors)
    _, scales, angles, xs, ys = factor_values()
    rows, cols = np.indices((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float64)
    out = np.zeros((len(factors), IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8)
    for n, (shape, i_scale, i_angle, i_x, i_y) in enumerate(factors):
        centre = IMAGE_SIZE * (CENTRE_MIN + CENTRE_SPAN * np.array([xs[i_x], ys[i_y]]))
        # Offsets (right, up) from the centre; the screen y axis points down.
        offsets = np.stack([cols + 0.5 - centre[0], centre[1] - (rows + 0.5)], axis=-1)
        theta = angles[i_angle]
        to_shape = np.array([[np.cos(theta), np.sin(theta)],
                             [-np.sin(theta), np.cos(theta)]]) / (HALF_SIZE * scales[i_scale])
        u, v = np.moveaxis(offsets @ to_shape.T, -1, 0)
        if shape == 0:
            lit = (np.abs(u) <= 1) & (np.abs(v) <= 1)
        elif shape == 1:
            lit = np.hypot(u, v / ELLIPSE_RATIO) <= 1
        elif shape == 2:
            a, b = HEART_SCALE * u, HEART_SCALE * v + HEART_SHIFT
            lit = (a ** 2 + b ** 2 - 1) ** 3 - a ** 2 * b ** 3 <= 0
        else:
            raise ValueError(f"render_numpy: shape index {shape} not in 0..2.")
        out[n, ..., 0] = np.where(lit, 255, 0)
    return out


# --------------------------------------------------------------------------------------
# The ground-truth interface.


class GroundTruthData(abc.ABC):
    """A dataset indexed by a full grid of discrete factors (disentanglement_lib's interface).

    Subclasses set ``factor_names``, ``factor_sizes`` and ``observation_shape``
    and implement :meth:`images_from_factors` and :meth:`batch_source`.
    """

    factor_names: tuple[str, ...]
    factor_sizes: tuple[int, ...]
    observation_shape: tuple[int, int, int]  # (H, W, C)

    @property
    def num_factors(self) -> int:
        return len(self.factor_sizes)

    @property
    def deterministic_observations(self) -> bool:
        """True when an observation is a fixed function of its factors (no noise, no random
        colour): ``sample_observations_from_factors`` then ignores its rng, and a deterministic
        representation of the whole grid can be computed once and looked up
        (:func:`vaekl.disentanglement.representation_table`). False unless a source says so."""
        return False

    @property
    def num_observations(self) -> int:
        """Size of the grid, e.g. 737,280 for dSprites (the dataset size N of β-TCVAE)."""
        return math.prod(self.factor_sizes)

    @property
    def factor_strides(self) -> np.ndarray:
        """int64 [F], last factor fastest."""
        return factor_strides(self.factor_sizes)

    def sample_factors(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Factor indices uniform over the grid: int64 [n, F]."""
        return rng.integers(0, np.asarray(self.factor_sizes), size=(n, self.num_factors))

    def factors_to_index(self, factors) -> np.ndarray:
        """Factor indices int [..., F] -> flat grid index int64 [...]; ValueError when out of range."""
        factors = np.asarray(factors)
        if factors.shape[-1:] != (self.num_factors,) or not np.issubdtype(factors.dtype, np.integer):
            raise ValueError(f"factors must be integers [..., {self.num_factors}], got "
                             f"{factors.dtype} {factors.shape}.")
        if np.any(factors < 0) or np.any(factors >= np.asarray(self.factor_sizes)):
            raise ValueError(f"factor indices out of range for factor_sizes {self.factor_sizes}.")
        return factors.astype(np.int64) @ self.factor_strides

    def index_to_factors(self, index) -> np.ndarray:
        """Flat grid index int [...] -> factor indices int64 [..., F]; ValueError when out of range."""
        index = np.asarray(index)
        if not np.issubdtype(index.dtype, np.integer):
            raise ValueError(f"index must be integers, got {index.dtype}.")
        if np.any(index < 0) or np.any(index >= self.num_observations):
            raise ValueError(f"index out of range [0, {self.num_observations}).")
        return (index.astype(np.int64)[..., None] // self.factor_strides) % np.asarray(self.factor_sizes)

    @abc.abstractmethod
    def images_from_factors(self, factors, rng: np.random.Generator | None = None) -> np.ndarray:
        """uint8 images [n, H, W, C] of factor indices int [n, F]."""

    def sample_observations_from_factors(self, factors, rng: np.random.Generator | None = None
                                         ) -> np.ndarray:
        """Observations float32 [n, H, W, C] in [0, 1] (the images / 255) of factors int [n, F]."""
        return self.images_from_factors(factors, rng).astype(np.float32) / np.float32(255)

    def sample_observations(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Observations float32 [n, H, W, C] of uniformly drawn factors."""
        return self.sample(n, rng)[1]

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(factors int64 [n, F], observations float32 [n, H, W, C]) drawn uniformly over the grid."""
        factors = self.sample_factors(n, rng)
        return factors, self.sample_observations_from_factors(factors, rng)

    @abc.abstractmethod
    def batch_source(self):
        """The on-device training batch source: ``(device_arrays, draw)``.

        ``draw(key, device_arrays, batch_size) -> uint8 [B, H, W, C]`` is pure
        and jittable (``batch_size`` static) and draws uniformly over the grid;
        ``device_arrays`` is a (host) pytree that the caller puts on the device
        once and passes to every ``draw``. ``draw`` is the same object on every
        call, so it may be a static argument.
        """


class DSprites(GroundTruthData):
    """dSprites-like ground truth rendered analytically (see the module docstring).

    Args:
      variant: "dsprites" (binary, 1 channel), "dsprites_color" or
        "dsprites_noisy" (RGB, colour/noise not a factor).
    """

    factor_names = FACTOR_NAMES
    factor_sizes = FACTOR_SIZES

    def __init__(self, variant: str = "dsprites"):
        if variant not in VARIANTS:
            raise ValueError(f"DSprites: unknown variant {variant!r}; expected one of {tuple(VARIANTS)}.")
        self.variant = variant
        self.observation_shape = (IMAGE_SIZE, IMAGE_SIZE, VARIANTS[variant])

    @property
    def deterministic_observations(self) -> bool:
        """Plain dSprites only: the colour and noise variants draw per image."""
        return self.variant == "dsprites"

    def images_from_factors(self, factors, rng: np.random.Generator | None = None) -> np.ndarray:
        """uint8 [n, 64, 64, C], rendered on the default device in chunks of ≤ 1024.

        ``rng`` draws the colours/noise of the RGB variants (required there,
        unused by plain dSprites).
        """
        factors = np.asarray(factors)
        self.factors_to_index(factors)  # validates
        n = len(factors)
        key = None
        if self.variant != "dsprites":
            if rng is None:
                raise ValueError(f"{self.variant}: sampling observations needs an rng.")
            key = jax.random.key(int(rng.integers(2 ** 31)))
        chunk = min(_CHUNK, 1 << max(n - 1, 0).bit_length())  # powers of two: few compilations
        padded = np.zeros((-(-n // chunk) * chunk, self.num_factors), np.int32)
        padded[:n] = factors
        out = [np.asarray(_observe_jit(None if key is None else jax.random.fold_in(key, i),
                                       padded[start:start + chunk], variant=self.variant))
               for i, start in enumerate(range(0, len(padded), chunk))]
        return np.concatenate(out)[:n] if out else np.zeros((0, *self.observation_shape), np.uint8)

    def batch_source(self):
        """``((), draw)``: nothing on the device; ``draw`` samples factors and renders."""
        return (), _DRAW[self.variant]


def _draw_packed(key: jax.Array, device_arrays: tuple[jax.Array], batch_size: int, *,
                 width: int) -> jax.Array:
    """A training batch from bit-packed binary images uint8 [N, H, ⌈W/8⌉]: uint8 [B, H, W, 1]."""
    (packed,) = device_arrays
    idx = jax.random.randint(key, (batch_size,), 0, packed.shape[0])
    bits = jnp.unpackbits(jnp.take(packed, idx, axis=0), axis=-1, count=width)
    return (bits * jnp.uint8(255))[..., None]


class ArrayGroundTruth(GroundTruthData):
    """Binary images stored for every point of a factor grid (e.g. the original dSprites file).

    Images are kept bit-packed (737,280 dSprites images: 377 MB instead of 3 GB),
    on the host and, through :meth:`batch_source`, on the device.

    Args:
      images: [N, H, W] (or [N, H, W, 1]) with values in {0, 1} (any nonzero is 1).
      factors: int [N, F], the factor indices of each image; together they must
        cover the grid ``max + 1`` per factor exactly once (in any order).
      factor_names: F names.
    """

    def __init__(self, images: np.ndarray, factors: np.ndarray, factor_names=FACTOR_NAMES):
        images = np.asarray(images)
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        factors = np.asarray(factors)
        if images.ndim != 3 or factors.ndim != 2 or len(images) != len(factors):
            raise ValueError(f"ArrayGroundTruth: need images [N, H, W] and factors [N, F], got "
                             f"{images.shape} and {factors.shape}.")
        if len(factor_names) != factors.shape[1]:
            raise ValueError(f"ArrayGroundTruth: {factors.shape[1]} factors but names {factor_names}.")
        self.factor_names = tuple(factor_names)
        self.factor_sizes = tuple(int(s) for s in factors.max(axis=0) + 1)
        self.observation_shape = (int(images.shape[1]), int(images.shape[2]), 1)
        index = self.factors_to_index(factors)
        if len(index) != self.num_observations or len(np.unique(index)) != len(index):
            raise ValueError(f"ArrayGroundTruth: {len(index)} images do not cover the factor grid "
                             f"{self.factor_sizes} ({self.num_observations} points) exactly once.")
        self.row_of_index = np.empty(len(index), np.int64)
        self.row_of_index[index] = np.arange(len(index))
        self.packed = np.packbits(images.astype(bool), axis=-1)  # [N, H, ⌈W/8⌉]
        self._draw = functools.partial(_draw_packed, width=self.observation_shape[1])

    def images_from_factors(self, factors, rng: np.random.Generator | None = None) -> np.ndarray:
        """uint8 [n, H, W, 1] in {0, 255}, looked up (``rng`` unused)."""
        rows = self.row_of_index[self.factors_to_index(factors)]
        bits = np.unpackbits(self.packed[rows], axis=-1, count=self.observation_shape[1])
        return (bits * np.uint8(255))[..., None]

    @property
    def deterministic_observations(self) -> bool:
        """One stored image per grid point: always."""
        return True

    def batch_source(self):
        """``((packed images,), draw)``: uniform over the stored images (= over the grid)."""
        return (self.packed,), self._draw


_ZIP_MAGIC = b"PK\x03\x04"


def read_npz(path: str, what: str, keys=None) -> dict[str, np.ndarray]:
    """The arrays of the .npz file ``path`` (only ``keys`` if given, those it has), read now.

    A file that is not an .npz (text, say) or is truncated or damaged raises one ValueError
    naming ``what`` and the file, instead of numpy's pickle message or zipfile's traceback;
    pickled arrays are refused.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _ZIP_MAGIC:
        raise ValueError(f"{what} {path} is not an .npz file (it starts with {head!r}, not a zip "
                         f"archive's {_ZIP_MAGIC!r}); give the path of an .npz written by numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files if keys is None or k in keys}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as e:
        text = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{what} {path} is damaged or truncated ({type(e).__name__}: {text}); "
                         f"download or write it again") from None


def load_npz(path: str) -> ArrayGroundTruth:
    """The original dSprites file (``imgs`` [N, 64, 64] {0, 1}, ``latents_classes`` [N, 6]).

    Column 0 of ``latents_classes`` (colour, constant) is dropped; factor sizes are
    the remaining columns' max + 1, so a smaller grid with the same keys works too.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dsprites_npz: no file {path} (expected "
                                f"dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz).")
    npz = read_npz(path, "dsprites_npz", ("imgs", "latents_classes"))
    missing = {"imgs", "latents_classes"} - set(npz)
    if missing:
        raise ValueError(f"dsprites_npz {path}: missing keys {sorted(missing)} (keys: {sorted(npz)}).")
    classes = npz["latents_classes"]
    images = npz["imgs"]
    if classes.ndim != 2 or classes.shape[1] != len(FACTOR_NAMES) + 1:
        raise ValueError(f"dsprites_npz {path}: latents_classes must be [N, 6], got {classes.shape}.")
    if np.any(classes[:, 0] != classes[0, 0]):
        raise ValueError(f"dsprites_npz {path}: latents_classes column 0 (colour) is not constant.")
    if images.max(initial=0) > 1:
        raise ValueError(f"dsprites_npz {path}: imgs must be {{0, 1}}, found values up to {images.max()}.")
    return ArrayGroundTruth(images, classes[:, 1:], FACTOR_NAMES)
