"""Calibration and evaluation data: files, folders and Python objects, as batches of feeds.

Whatever the user gives is turned into a :class:`DataSource`, which yields
``{input_name: float32 batch}`` dicts checked against the model's inputs. Sources backed by
files or arrays can be read again (for the verification run); one-shot sources such as
generators and onnxruntime ``CalibrationDataReader`` objects are read once.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx

from ..errors import MxqnError

Feed = Dict[str, np.ndarray]
LABEL_KEYS = ("labels", "label", "y", "targets")
PREPROCESSING = ("none", "unit", "imagenet")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, shape (ints for fixed dims, None for dynamic) and numpy dtype."""

    name: str
    shape: Tuple[Optional[int], ...]
    dtype: np.dtype

    def describe(self) -> str:
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.dtype.name}[{dims}]"


def input_specs(model: onnx.ModelProto) -> List[InputSpec]:
    """The model's real inputs (initializers listed as inputs are not inputs)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim
        )
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype("float32")
        specs.append(InputSpec(vi.name, shape, dtype))
    return specs


def check_feed(feed: Feed, specs: Sequence[InputSpec], where: str) -> Feed:
    """Validate names, ranks, fixed dims and dtypes; cast float64 to float32."""
    names = {s.name for s in specs}
    missing = [s.name for s in specs if s.name not in feed]
    extra = [k for k in feed if k not in names]
    if missing or extra:
        msg = f"{where}: "
        if missing:
            msg += f"no data for input(s) {', '.join(missing)}"
        if extra:
            msg += ("; " if missing else "") + f"unknown name(s) {', '.join(extra)}"
        raise MxqnError(msg + "; the model's inputs are " + ", ".join(f"{s.name} {s.describe()}" for s in specs))
    out = {}
    for s in specs:
        a = np.asarray(feed[s.name])
        if a.dtype != s.dtype:
            if np.issubdtype(s.dtype, np.floating) and np.issubdtype(a.dtype, np.floating):
                a = a.astype(s.dtype)
            else:
                raise MxqnError(
                    f"{where}: input '{s.name}' has dtype {a.dtype}, the model expects {s.describe()}"
                )
        if a.ndim != len(s.shape) or any(d is not None and d != n for d, n in zip(s.shape, a.shape)):
            raise MxqnError(
                f"{where}: input '{s.name}' has shape {list(a.shape)}, the model expects {s.describe()}"
            )
        if np.issubdtype(a.dtype, np.floating):
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            if bad:
                # caught here, it names the data; caught later it would name some inner tensor
                raise MxqnError(
                    f"{where}: input '{s.name}' holds {bad} NaN or Inf value(s); clean the data first"
                )
        out[s.name] = np.ascontiguousarray(a)
    return out


class DataSource:
    """Batches of feeds. ``reiterable`` says whether iterating again gives the same data;
    ``synthetic`` that it is generated (random), so it says nothing about the real inputs."""

    def __init__(self, factory: Callable[[], Iterator[Feed]], specs: Sequence[InputSpec],
                 total: Optional[int], reiterable: bool, label: str,
                 labels: Optional[np.ndarray] = None, synthetic: bool = False) -> None:
        self._factory = factory
        self.specs = list(specs)
        self.total = total
        self.reiterable = reiterable
        self.label = label
        self.labels = labels
        self.synthetic = synthetic

    def batches(self, limit: Optional[int] = None) -> Iterator[Feed]:
        """Checked batches, stopping after ``limit`` samples."""
        seen = 0
        for i, feed in enumerate(_rebatch(self._factory(), self.specs, self.label)):
            feed = check_feed(feed, self.specs, f"{self.label} (batch {i})")
            n = batch_len(feed)
            if limit is not None and seen + n > limit:
                keep = limit - seen
                if keep <= 0:
                    return
                feed = {k: v[:keep] for k, v in feed.items()}
                n = keep
            seen += n
            yield feed
            if limit is not None and seen >= limit:
                return
        if seen == 0:
            raise MxqnError(f"{self.label}: no calibration samples; give a non-empty data set")


def fixed_batch(specs: Sequence[InputSpec]) -> Optional[int]:
    """The batch size every input fixes (old exports often say 1), or None when it is dynamic."""
    dims = {s.shape[0] if s.shape else None for s in specs}
    if len(dims) != 1:
        return None
    return dims.pop()


def _rebatch(feeds: Iterable[Feed], specs: Sequence[InputSpec], label: str) -> Iterator[Feed]:
    """Split batches into the model's fixed batch size, so any --batch-size works.

    A trailing remainder smaller than the fixed batch cannot be fed; it is dropped with a
    warning rather than failing the whole run.
    """
    size = fixed_batch(specs)
    for feed in feeds:
        lengths = {np.ndim(v) and np.shape(v)[0] for v in feed.values()}
        n = lengths.pop() if len(lengths) == 1 else None
        ranks_ok = all(np.ndim(feed.get(s.name)) == len(s.shape) for s in specs)
        if size is None or n is None or n == size or n < size or not ranks_ok:
            yield feed  # check_feed reports anything that does not fit
            continue
        whole = n - n % size
        for start in range(0, whole, size):
            yield {k: v[start:start + size] for k, v in feed.items()}
        if whole < n:
            warnings.warn(f"{label}: the model takes batches of exactly {size} samples; "
                          f"dropped the last {n - whole} sample(s) of a batch of {n}", stacklevel=2)


def batch_len(feed: Feed) -> int:
    """Samples in a feed (its first input's leading dimension)."""
    first = next(iter(feed.values()))
    return int(first.shape[0]) if first.ndim else 1


def _array_batches(arrays: Dict[str, np.ndarray], batch_size: int) -> Callable[[], Iterator[Feed]]:
    n = min(len(a) for a in arrays.values())

    def gen() -> Iterator[Feed]:
        for start in range(0, n, batch_size):
            yield {k: np.asarray(v[start:start + batch_size]) for k, v in arrays.items()}

    return gen


def _from_arrays(arrays: Dict[str, np.ndarray], specs, batch_size, label) -> DataSource:
    arrays = dict(arrays)
    labels = None
    for key in LABEL_KEYS:
        if key in arrays and key not in {s.name for s in specs}:
            labels = np.asarray(arrays.pop(key))
    if not arrays:
        raise MxqnError(f"{label}: holds no input arrays")
    lengths = {k: (len(v) if np.ndim(v) else 0) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise MxqnError(f"{label}: arrays have different numbers of samples: {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise MxqnError(f"{label}: holds no samples")
    return DataSource(_array_batches(arrays, batch_size), specs, n, True, label, labels)


def _single_input(specs, label) -> InputSpec:
    if len(specs) != 1:
        raise MxqnError(
            f"{label}: a single array needs a single-input model, but the model has inputs "
            f"{', '.join(s.name for s in specs)}; use an .npz with one key per input"
        )
    return specs[0]


def _load_npz(path: Path) -> Dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:
        raise MxqnError(f"{path}: cannot read as .npz ({exc})") from None


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise MxqnError(f"{path}: cannot read as .npy ({exc})") from None


def _image_layout(spec: InputSpec) -> Tuple[str, int, Optional[int], Optional[int]]:
    """('nchw'|'nhwc', channels, height, width) of an image input."""
    if len(spec.shape) != 4:
        raise MxqnError(f"input '{spec.name}' is {spec.describe()}, not a 4-D image batch; use .npy/.npz data")
    if spec.shape[1] in (1, 3):
        return "nchw", spec.shape[1], spec.shape[2], spec.shape[3]
    if spec.shape[3] in (1, 3):
        return "nhwc", spec.shape[3], spec.shape[1], spec.shape[2]
    raise MxqnError(
        f"input '{spec.name}' is {spec.describe()}: cannot tell where the 1 or 3 colour channels are"
    )


def load_image(path: Path, channels: int, size: Tuple[int, int], preprocess: str) -> np.ndarray:
    """Decode one image to float32 HWC, resized (and for ``imagenet`` centre-cropped) to ``size``."""
    from PIL import Image, UnidentifiedImageError

    h, w = size
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if preprocess == "imagenet":
                short = round(min(h, w) * 256 / 224)
                scale = short / min(im.size)
                im = im.resize((max(w, round(im.size[0] * scale)), max(h, round(im.size[1] * scale))),
                               Image.BILINEAR)
                left, top = (im.size[0] - w) // 2, (im.size[1] - h) // 2
                im = im.crop((left, top, left + w, top + h))
            else:
                im = im.resize((w, h), Image.BILINEAR)
            a = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MxqnError(f"{path}: cannot read this image ({type(exc).__name__}); remove it or convert it") from None
    if a.ndim == 2:
        a = a[:, :, None]
    if preprocess in ("unit", "imagenet"):
        a = a / 255.0
    if preprocess == "imagenet":
        if channels != 3:
            raise MxqnError("ImageNet preprocessing needs a 3-channel model input")
        a = (a - IMAGENET_MEAN) / IMAGENET_STD
    return a.astype(np.float32)


def _from_folder(folder: Path, specs, batch_size, preprocess, image_size, label) -> DataSource:
    spec = _single_input(specs, label)
    if preprocess not in PREPROCESSING:
        raise MxqnError(f"unknown preprocessing '{preprocess}'; choose one of {', '.join(PREPROCESSING)}")
    layout, channels, h, w = _image_layout(spec)
    if image_size is not None:
        h, w = image_size
    if h is None or w is None:
        raise MxqnError(
            f"input '{spec.name}' has dynamic height/width; give the image size (--image-size H W)"
        )
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MxqnError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")

    def gen() -> Iterator[Feed]:
        for start in range(0, len(files), batch_size):
            imgs = np.stack([load_image(p, channels, (h, w), preprocess) for p in files[start:start + batch_size]])
            if layout == "nchw":
                imgs = imgs.transpose(0, 3, 1, 2)
            yield {spec.name: np.ascontiguousarray(imgs)}

    return DataSource(gen, specs, len(files), True, label)


def _random_source(specs, batch_size, count, label) -> DataSource:
    for s in specs:
        if not np.issubdtype(s.dtype, np.floating):
            raise MxqnError(f"random calibration cannot feed the {s.describe()} input '{s.name}'")
    n = count or 32

    def gen() -> Iterator[Feed]:
        rng = np.random.default_rng(0)
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            yield {s.name: rng.standard_normal((b,) + tuple(224 if d is None else d for d in s.shape[1:]))
                   .astype(s.dtype) for s in specs}

    return DataSource(gen, specs, n, True, label, synthetic=True)


def _from_reader(reader, specs) -> DataSource:
    def gen() -> Iterator[Feed]:
        while True:
            feed = reader.get_next()
            if feed is None:
                return
            yield dict(feed)

    return DataSource(gen, specs, None, False, "calibration data reader")


def _from_iterable(items: Iterable, specs) -> DataSource:
    reiterable = isinstance(items, (list, tuple))

    def gen() -> Iterator[Feed]:
        for item in items:
            if isinstance(item, dict):
                yield item
            else:
                spec = _single_input(specs, "calibration iterable")
                a = np.asarray(item)
                if a.ndim == len(spec.shape) - 1:
                    a = a[None]
                yield {spec.name: a}

    return DataSource(gen, specs, None, reiterable, "calibration iterable")


CalibrationLike = Union[str, os.PathLike, np.ndarray, Dict[str, np.ndarray], Iterable, object]


def make_source(
    data: CalibrationLike,
    specs: Sequence[InputSpec],
    batch_size: int = 16,
    preprocess: str = "none",
    image_size: Optional[Tuple[int, int]] = None,
    random_count: Optional[int] = None,
) -> DataSource:
    """Turn what the user gave into a :class:`DataSource` for the model's inputs.

    Sources that can be read twice are checked on their first batch here, so data that
    does not fit the model is reported before any work starts.
    """
    source = _dispatch(data, specs, batch_size, preprocess, image_size, random_count)
    if source.reiterable:
        next(source.batches(1), None)  # raises MxqnError on a mismatch or an empty set
    return source


def _dispatch(data, specs, batch_size, preprocess, image_size, random_count) -> DataSource:
    if data is None:
        raise MxqnError(
            "no calibration data; give --calib FILE|FOLDER (or --calib random for a smoke test)"
        )
    if isinstance(data, (str, os.PathLike)):
        if str(data) == "random":
            return _random_source(specs, batch_size, random_count, "random calibration data")
        path = Path(data)
        if not path.exists():
            raise MxqnError(f"{path}: calibration data not found; give an .npy, .npz or image folder")
        if path.is_dir():
            return _from_folder(path, specs, batch_size, preprocess, image_size, str(path))
        if path.suffix == ".npz":
            return _from_arrays(_load_npz(path), specs, batch_size, str(path))
        if path.suffix == ".npy":
            spec = _single_input(specs, str(path))
            return _from_arrays({spec.name: _load_npy(path)}, specs, batch_size, str(path))
        raise MxqnError(f"{path}: unknown calibration format; use .npy, .npz or a folder of images")
    if isinstance(data, np.ndarray):
        spec = _single_input(specs, "calibration array")
        return _from_arrays({spec.name: data}, specs, batch_size, "calibration array")
    if isinstance(data, dict):
        return _from_arrays(data, specs, batch_size, "calibration dict")
    if hasattr(data, "get_next"):
        return _from_reader(data, specs)
    if isinstance(data, DataSource):
        return data
    if hasattr(data, "__iter__"):
        return _from_iterable(data, specs)
    raise MxqnError(
        f"cannot use a {type(data).__name__} as calibration data; give a path, an array, "
        "a dict of arrays, an iterable of feeds or a CalibrationDataReader"
    )


#: held-back samples: a quarter of the calibration set, within these bounds
HELD_BACK_MIN, HELD_BACK_MAX = 2, 32


def held_back_count(config, source: DataSource, shifts: bool = False) -> int:
    """How many of the first calibration samples are held back (0: no check).

    Only where the check can run: verification on, uniform widths (mixed precision measures
    its own candidates), a known sample count of at least 4 * HELD_BACK_MIN, and something
    data-derived to check (bias correction from data means, data-aware rounding, the
    depthwise input shifts when ``shifts``, ``auto`` layer-output quantizers, or the first
    and last layer at ``keep_bits``).
    """
    if not config.holdout or not config.verify or config.allocation_mode is not None:
        return 0
    total = min(x for x in (config.calib_count, source.total) if x is not None) \
        if (config.calib_count or source.total) else None
    if total is None or total < 4 * HELD_BACK_MIN:
        return 0
    if not config.bias_correction and config.rounding == "nearest" and not shifts \
            and not config.layer_outputs_on_trial and not config.keep_ends_on_trial:
        return 0
    count = int(min(HELD_BACK_MAX, max(HELD_BACK_MIN, total // 4)))
    b = fixed_batch(source.specs) or 1  # whole batches only, where the model fixes the batch size
    count = -(-count // b) * b
    return count if total >= 4 * count else 0


def take_batches(batches, limit: int):
    """The first batches holding up to ``limit`` samples."""
    out, n = [], 0
    for b in batches:
        if n >= limit:
            break
        out.append(b)
        n += int(next(iter(b.values())).shape[0])
    return out


def first_samples(source: DataSource, kept: list, count: int) -> list:
    """The first ``count`` calibration samples as feeds (from the source, or the kept batches)."""
    batches = source.batches(count) if source.reiterable else iter(kept)
    out, n = [], 0
    for b in batches:
        m = int(np.asarray(next(iter(b.values()))).shape[0])
        take = min(m, count - n)
        out.append(b if take == m else {k: np.asarray(v)[:take] for k, v in b.items()})
        n += take
        if n >= count:
            break
    return out
