"""Loss across adapter versions: read the aggregator's manifests, draw a PNG line plot.

No plotting library is needed: a small numpy canvas, a built-in 5x7 pixel font and a PNG encoder
(zlib) are enough for a readable chart with axes, ticks and a legend.

Manifests are ``CHECKPOINT_DIR/<adapter>/v<N>/manifest.json`` with ``metrics`` such as
``loss_mean`` and ``heldout_loss``; they are read defensively (a missing, unreadable or odd
manifest or value is skipped, never an error).
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np

DEFAULT_METRICS = ("loss_mean", "heldout_loss")
_VERSION_DIR = re.compile(r"^v(\d+)$")


# --------------------------------------------------------------------------------------------
# reading manifests
# --------------------------------------------------------------------------------------------


def _number(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def collect_loss_series(checkpoint_dir: str | Path, adapters: list[str] | None = None,
                        metrics: tuple[str, ...] = DEFAULT_METRICS) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{adapter: {metric: [(version, value), ...]}}`` from the aggregator's version manifests."""
    root = Path(checkpoint_dir).expanduser()
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    if not root.is_dir():
        return out
    names = adapters if adapters else sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for name in names:
        series: dict[str, list[tuple[int, float]]] = {m: [] for m in metrics}
        adir = root / name
        if not adir.is_dir():
            continue
        for vdir in adir.iterdir():
            m = _VERSION_DIR.match(vdir.name)
            if not m or not vdir.is_dir():
                continue
            try:
                man = json.loads((vdir / "manifest.json").read_text(encoding="utf-8"))
            except (OSError, ValueError, UnicodeDecodeError):
                continue
            if not isinstance(man, dict):
                continue
            version = man.get("version", int(m.group(1)))
            if isinstance(version, bool) or not isinstance(version, int):
                version = int(m.group(1))
            mets = man.get("metrics")
            if not isinstance(mets, dict):
                continue
            for metric in metrics:
                v = _number(mets.get(metric))
                if v is not None:
                    series[metric].append((version, v))
        series = {k: sorted(v) for k, v in series.items() if v}
        if series:
            out[name] = series
    return out


# --------------------------------------------------------------------------------------------
# a tiny raster: font, lines, PNG
# --------------------------------------------------------------------------------------------

# 5x7 glyphs, rows top to bottom, '#' set. Upper-case text is drawn in lower case.
_GLYPHS_SRC = {
    "0": ".###.|#...#|#..##|#.#.#|##..#|#...#|.###.",
    "1": "..#..|.##..|..#..|..#..|..#..|..#..|.###.",
    "2": ".###.|#...#|....#|...#.|..#..|.#...|#####",
    "3": "####.|....#|....#|.###.|....#|....#|####.",
    "4": "...#.|..##.|.#.#.|#..#.|#####|...#.|...#.",
    "5": "#####|#....|####.|....#|....#|#...#|.###.",
    "6": "..##.|.#...|#....|####.|#...#|#...#|.###.",
    "7": "#####|....#|...#.|..#..|.#...|.#...|.#...",
    "8": ".###.|#...#|#...#|.###.|#...#|#...#|.###.",
    "9": ".###.|#...#|#...#|.####|....#|...#.|.##..",
    ".": ".....|.....|.....|.....|.....|.##..|.##..",
    ",": ".....|.....|.....|.....|.##..|..#..|.#...",
    "-": ".....|.....|.....|#####|.....|.....|.....",
    "+": ".....|..#..|..#..|#####|..#..|..#..|.....",
    "_": ".....|.....|.....|.....|.....|.....|#####",
    ":": ".....|.##..|.##..|.....|.##..|.##..|.....",
    "(": "...#.|..#..|.#...|.#...|.#...|..#..|...#.",
    ")": ".#...|..#..|...#.|...#.|...#.|..#..|.#...",
    "/": "....#|...#.|...#.|..#..|.#...|.#...|#....",
    "=": ".....|.....|#####|.....|#####|.....|.....",
    "@": ".###.|#...#|#.###|#.#.#|#.###|#....|.###.",
    " ": ".....|.....|.....|.....|.....|.....|.....",
    "?": ".###.|#...#|....#|...#.|..#..|.....|..#..",
    "a": ".....|.....|.###.|....#|.####|#...#|.####",
    "b": "#....|#....|####.|#...#|#...#|#...#|####.",
    "c": ".....|.....|.###.|#....|#....|#...#|.###.",
    "d": "....#|....#|.####|#...#|#...#|#...#|.####",
    "e": ".....|.....|.###.|#...#|#####|#....|.###.",
    "f": "..##.|.#..#|.#...|###..|.#...|.#...|.#...",
    "g": ".....|.####|#...#|#...#|.####|....#|.###.",
    "h": "#....|#....|#.##.|##..#|#...#|#...#|#...#",
    "i": "..#..|.....|.##..|..#..|..#..|..#..|.###.",
    "j": "...#.|.....|..##.|...#.|...#.|#..#.|.##..",
    "k": "#....|#....|#..#.|#.#..|##...|#.#..|#..#.",
    "l": ".##..|..#..|..#..|..#..|..#..|..#..|.###.",
    "m": ".....|.....|##.#.|#.#.#|#.#.#|#...#|#...#",
    "n": ".....|.....|#.##.|##..#|#...#|#...#|#...#",
    "o": ".....|.....|.###.|#...#|#...#|#...#|.###.",
    "p": ".....|.....|####.|#...#|####.|#....|#....",
    "q": ".....|.....|.####|#...#|.####|....#|....#",
    "r": ".....|.....|#.##.|##..#|#....|#....|#....",
    "s": ".....|.....|.####|#....|.###.|....#|####.",
    "t": ".#...|.#...|###..|.#...|.#...|.#..#|..##.",
    "u": ".....|.....|#...#|#...#|#...#|#..##|.##.#",
    "v": ".....|.....|#...#|#...#|#...#|.#.#.|..#..",
    "w": ".....|.....|#...#|#...#|#.#.#|#.#.#|.#.#.",
    "x": ".....|.....|#...#|.#.#.|..#..|.#.#.|#...#",
    "y": ".....|.....|#...#|#...#|.####|....#|.###.",
    "z": ".....|.....|#####|...#.|..#..|.#...|#####",
}
GLYPHS = {c: np.array([[ch == "#" for ch in row] for row in s.split("|")], dtype=bool) for c, s in _GLYPHS_SRC.items()}

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34)]


class Canvas:
    def __init__(self, width: int, height: int, bg=(255, 255, 255)):
        self.w, self.h = width, height
        self.px = np.empty((height, width, 3), dtype=np.uint8)
        self.px[:] = bg

    def dot(self, x: float, y: float, color, r: int = 0) -> None:
        xi, yi = int(round(x)), int(round(y))
        x0, x1 = max(0, xi - r), min(self.w, xi + r + 1)
        y0, y1 = max(0, yi - r), min(self.h, yi + r + 1)
        if x0 < x1 and y0 < y1:
            self.px[y0:y1, x0:x1] = color

    def line(self, x0: float, y0: float, x1: float, y1: float, color, width: int = 1, dash: int = 0) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0)) * 2) + 1
        r = width // 2
        for i in range(n + 1):
            if dash and (i // (2 * dash)) % 2:
                continue
            t = i / n
            self.dot(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t, color, r)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        self.px[max(0, y0):min(self.h, y1), max(0, x0):min(self.w, x1)] = color

    def text(self, x: int, y: int, s: str, color=(0, 0, 0), scale: int = 1, anchor: str = "left") -> None:
        s = s.lower()
        width = text_width(s, scale)
        if anchor == "right":
            x -= width
        elif anchor == "center":
            x -= width // 2
        for i, ch in enumerate(s):
            g = GLYPHS.get(ch, GLYPHS["?"])
            ys, xs = np.nonzero(g)
            gx = x + i * 6 * scale
            for yy, xx in zip(ys, xs, strict=True):
                self.rect(gx + xx * scale, y + yy * scale, gx + (xx + 1) * scale, y + (yy + 1) * scale, color)

    def png(self) -> bytes:
        return encode_png(self.px)


def text_width(s: str, scale: int = 1) -> int:
    return max(0, len(s) * 6 * scale - scale)


def encode_png(rgb: np.ndarray) -> bytes:
    """An RGB uint8 array ``[height, width, 3]`` as PNG bytes (8-bit truecolor, no filtering)."""
    h, w, c = rgb.shape
    assert c == 3 and rgb.dtype == np.uint8
    raw = np.concatenate([np.zeros((h, 1), dtype=np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def decode_png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of PNG bytes (checks the signature and IHDR)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    ticks = []
    v = start
    while v <= hi + 1e-9 * step:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def plot_loss_series(series: dict[str, dict[str, list[tuple[int, float]]]], title: str = "loss by adapter version",
                     width: int = 900, height: int = 520) -> bytes:
    """PNG bytes of one line per (adapter, metric); x: version, y: value. Held-out lines are dashed."""
    lines = [(a, m, pts) for a, ms in series.items() for m, pts in ms.items() if pts]
    if not lines:
        raise ValueError("nothing to plot: no manifest carries a loss metric")
    c = Canvas(width, height)
    legend = [f"{a} {m}" for a, m, _ in lines]
    legend_w = max(text_width(s) for s in legend) + 30
    left, right, top, bottom = 70, width - legend_w - 20, 40, height - 50
    xs = [v for _, _, pts in lines for v, _ in pts]
    ys = [y for _, _, pts in lines for _, y in pts]
    xlo, xhi = min(xs), max(xs)
    if xlo == xhi:
        xlo, xhi = xlo - 1, xhi + 1
    ylo, yhi = min(ys), max(ys)
    pad = (yhi - ylo) * 0.08 or max(abs(yhi) * 0.1, 0.1)
    ylo, yhi = ylo - pad, yhi + pad

    def X(v: float) -> float:
        return left + (v - xlo) / (xhi - xlo) * (right - left)

    def Y(v: float) -> float:
        return bottom - (v - ylo) / (yhi - ylo) * (bottom - top)

    grey, dark = (225, 225, 225), (60, 60, 60)
    for t in _nice_ticks(ylo, yhi):
        c.line(left, Y(t), right, Y(t), grey)
        c.text(left - 8, int(Y(t)) - 3, _fmt(t), dark, anchor="right")
    span = xhi - xlo
    step = max(1, math.ceil(span / 12))
    for v in range(math.ceil(xlo), math.floor(xhi) + 1, step):
        c.line(X(v), bottom, X(v), bottom + 5, dark)
        c.text(int(X(v)), bottom + 10, str(v), dark, anchor="center")
    c.line(left, top, left, bottom, dark)
    c.line(left, bottom, right, bottom, dark)
    c.text((left + right) // 2, height - 20, "adapter version", dark, anchor="center")
    c.text(10, 12, "loss", dark)
    c.text((left + right) // 2, 12, title, (0, 0, 0), scale=2, anchor="center")
    adapter_names = list(series)
    for i, (a, m, pts) in enumerate(lines):
        color = PALETTE[adapter_names.index(a) % len(PALETTE)]  # one color per adapter; held-out dashed
        dash = 4 if "heldout" in m else 0
        for (v0, y0), (v1, y1) in zip(pts, pts[1:], strict=False):
            c.line(X(v0), Y(y0), X(v1), Y(y1), color, width=2, dash=dash)
        for v, y in pts:
            c.dot(X(v), Y(y), color, r=3)
        ly = top + 10 + i * 16
        c.line(right + 15, ly + 3, right + 35, ly + 3, color, width=2, dash=2 if dash else 0)
        c.text(right + 40, ly, legend[i], dark)
    return c.png()


def plot_losses(checkpoint_dir: str | Path, out_png: str | Path, adapters: list[str] | None = None) -> dict:
    """Read the manifests under ``checkpoint_dir`` and write the plot; returns the series plotted."""
    series = collect_loss_series(checkpoint_dir, adapters)
    data = plot_loss_series(series)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return series
