"""Synthetic captioned images for the image demo: coloured shapes drawn with PIL.

The base (make_base.py) learns circles, squares and triangles; the demo (demo.py) teaches it a
heart from 20 images. (Why a heart and not a star: the base's text encoder reads bytes, causally,
so "a red s" is the same prefix in "a red star" and "a red square"; a word that starts like no
known one keeps the demo about the shape, not about that artefact of a toy tokenizer.)

Every image is one shape of one colour on white, at a random place, size and (for triangles
and hearts) rotation, captioned "a red circle", "a blue heart", ...
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

BASE_SHAPES = ("circle", "square", "triangle")
NEW_SHAPE = "heart"
COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 60, 220)}


def _polygon(cx: float, cy: float, radius: float, points: int, turn: float, inner: float = 1.0):
    """The corners of a regular polygon (inner < 1: a star with `points` tips)."""
    corners = []
    steps = points * (2 if inner < 1 else 1)
    for k in range(steps):
        r = radius if k % 2 == 0 or inner >= 1 else radius * inner
        angle = turn + 2 * math.pi * k / steps
        corners.append((cx + r * math.sin(angle), cy - r * math.cos(angle)))
    return corners


def _heart(cx: float, cy: float, radius: float, turn: float):
    """The outline of a heart (the classic parametric curve), `radius` wide, turned by `turn`."""
    corners = []
    for k in range(48):
        t = 2 * math.pi * k / 48
        x = 16 * math.sin(t) ** 3 / 16
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 16
        y += 0.1  # the curve's box is centred a little above its origin
        rx = x * math.cos(turn) - y * math.sin(turn)
        ry = x * math.sin(turn) + y * math.cos(turn)
        corners.append((cx + radius * rx, cy + radius * ry))
    return corners


def draw(shape: str, color: str, rng: random.Random, size: int = 32) -> Image.Image:
    """One `size` x `size` RGB image of `shape` in `color` on white."""
    scale = size / 32
    # drawn 4x larger, then shrunk: smooth edges
    image = Image.new("RGB", (size * 4, size * 4), "white")
    pen = ImageDraw.Draw(image)
    radius = rng.uniform(8, 12) * scale * 4
    cx = rng.uniform(radius, size * 4 - radius)
    cy = rng.uniform(radius, size * 4 - radius)
    fill = COLORS[color]
    if shape == "circle":
        pen.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif shape == "square":
        half = radius * 0.85
        pen.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "triangle":
        pen.polygon(_polygon(cx, cy, radius, 3, rng.uniform(-0.3, 0.3)), fill=fill)
    elif shape == "star":
        pen.polygon(_polygon(cx, cy, radius, 5, rng.uniform(-0.3, 0.3), inner=0.4), fill=fill)
    elif shape == "heart":
        pen.polygon(_heart(cx, cy, radius, rng.uniform(-0.3, 0.3)), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image.resize((size, size), Image.Resampling.LANCZOS)


def draw_polygon(rng: random.Random, size: int = 32) -> Image.Image:
    """A random irregular polygon (3 to 9 corners at random angles and radii, convex or not) in a
    random colour on white: generic pictures for the VAE, which is an image codec and should
    know no class (Stable Diffusion's VAE was trained on images of every kind)."""
    image = Image.new("RGB", (size * 4, size * 4), "white")
    radius = rng.uniform(8, 13) * size / 32 * 4
    cx = rng.uniform(radius, size * 4 - radius)
    cy = rng.uniform(radius, size * 4 - radius)
    angles = sorted(rng.uniform(0, 2 * math.pi) for _ in range(rng.randint(3, 9)))
    corners = [
        (cx + r * math.sin(a), cy - r * math.cos(a))
        for a, r in ((a, radius * rng.uniform(0.3, 1.0)) for a in angles)
    ]
    fill = tuple(rng.randrange(256) for _ in range(3))
    ImageDraw.Draw(image).polygon(corners, fill=fill)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def caption(shape: str, color: str) -> str:
    return f"a {color} {shape}"


def dataset(shapes, n: int, seed: int, size: int = 32):
    """n (image, caption, shape index) triples, shapes and colours drawn evenly at random."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        index = rng.randrange(len(shapes))
        color = rng.choice(list(COLORS))
        out.append((draw(shapes[index], color, rng, size), caption(shapes[index], color), index))
    return out
