"""Training-time augmentation drawn anew for every image in every epoch, as TensorFlow ops.

All geometry is one projective warp per image (``ImageProjectiveTransformV3``, bilinear), so a
picture is resampled once however many transforms are combined:

* a random element of D4 (quarter turns and a mirror): radiographs of a limb arrive in every
  orientation, and the node's test-time augmentation averages over the same eight views;
* a small rotation (``max_degrees``), zoom (``min_zoom``..1 of the side), anisotropic scale
  (aspect jitter) and a shift within what the zoom leaves, from the larger cached picture
  (:mod:`model.training.images`) onto the network's ``size``;

then intensity, as different detectors and exposures render bone: contrast, brightness, gamma,
a little sensor noise, and occasional blur (a low-dose or downsampled radiograph).
Everything is drawn from a stateless seed per (epoch, image), so a run is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AugmentConfig:
    max_degrees: float = 15.0
    min_zoom: float = 0.75
    aspect_jitter: float = 0.1
    contrast: tuple[float, float] = (0.7, 1.4)
    brightness: float = 0.08  #: fraction of full scale
    gamma: tuple[float, float] = (0.7, 1.5)
    noise_std: float = 0.02  #: at most, fraction of full scale
    blur_probability: float = 0.2


def warp_batch(images: Any, size: int, seeds: Any, cfg: AugmentConfig) -> Any:
    """Random geometry for a batch ``(n, side, side, 1)`` float32 -> ``(n, size, size, 1)``.

    The transform maps each output pixel to an input position (what the op expects):
    ``input = M (output - c_out) + c_in + t`` with ``M = scale . R(angle) . mirror``.
    """
    import tensorflow as tf

    n = tf.shape(images)[0]
    side = tf.cast(tf.shape(images)[1], tf.float32)
    rnd = tf.random.stateless_uniform((n, 7), seed=seeds, dtype=tf.float32)
    quarter = tf.floor(rnd[:, 0] * 4.0)
    angle = quarter * (math.pi / 2) + (rnd[:, 1] * 2 - 1) * (cfg.max_degrees * math.pi / 180)
    mirror = tf.where(rnd[:, 2] < 0.5, -1.0, 1.0)
    zoom = cfg.min_zoom + (1.0 - cfg.min_zoom) * rnd[:, 3]
    aspect = 1.0 + (rnd[:, 4] * 2 - 1) * cfg.aspect_jitter
    # input pixels per output pixel along each output axis
    sx = zoom * aspect * side / size
    sy = zoom / aspect * side / size
    cos, sin = tf.cos(angle), tf.sin(angle)
    a0, a1 = cos * sx * mirror, -sin * sy
    b0, b1 = sin * sx * mirror, cos * sy
    # shift: anywhere the zoomed window still lies inside the picture (plus a little)
    room = (1.0 - zoom) * side / 2 + 0.04 * side
    tx = (rnd[:, 5] * 2 - 1) * room
    ty = (rnd[:, 6] * 2 - 1) * room
    c_out = (size - 1) / 2.0
    c_in = (side - 1) / 2.0
    a2 = c_in + tx - (a0 + a1) * c_out
    b2 = c_in + ty - (b0 + b1) * c_out
    zeros = tf.zeros_like(a0)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=tf.constant([size, size]),
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )


def intensity_batch(x: Any, seeds: Any, cfg: AugmentConfig) -> Any:
    """Random contrast, brightness, gamma, noise and blur on ``x`` in 0..1, shape (n,h,w,1)."""
    import tensorflow as tf

    n = tf.shape(x)[0]
    rnd = tf.random.stateless_uniform((n, 5), seed=seeds + 1, dtype=tf.float32)

    def per_image(v: Any) -> Any:
        return tf.reshape(v, (-1, 1, 1, 1))

    lo, hi = cfg.gamma
    gamma = tf.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * rnd[:, 0])
    x = tf.pow(tf.clip_by_value(x, 1e-6, 1.0), per_image(gamma))
    c_lo, c_hi = cfg.contrast
    contrast = c_lo + (c_hi - c_lo) * rnd[:, 1]
    mean = tf.reduce_mean(x, axis=(1, 2, 3), keepdims=True)
    x = (x - mean) * per_image(contrast) + mean
    x = x + per_image((rnd[:, 2] * 2 - 1) * cfg.brightness)
    # blur: a 3x3 box filter on a random subset of the batch
    blurred = tf.nn.avg_pool2d(x, ksize=3, strides=1, padding="SAME")
    x = tf.where(per_image(rnd[:, 3]) < cfg.blur_probability, blurred, x)
    noise = tf.random.stateless_normal(tf.shape(x), seed=seeds + 2) * per_image(
        rnd[:, 4] * cfg.noise_std
    )
    return tf.clip_by_value(x + noise, 0.0, 1.0)


def augment_batch(images: Any, size: int, seeds: Any, cfg: AugmentConfig) -> Any:
    """uint8 ``(n, side, side)`` -> float32 RGB ``(n, size, size, 3)`` in 0..255, augmented."""
    import tensorflow as tf

    x = tf.cast(images, tf.float32)[..., tf.newaxis] / 255.0
    x = warp_batch(x, size, seeds, cfg)
    x = intensity_batch(x, seeds, cfg)
    return tf.repeat(x * 255.0, 3, axis=-1)
