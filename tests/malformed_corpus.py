"""Generate an ImageFolder tree full of awkward files, with the outcome intake must give each.

    from malformed_corpus import make_malformed_corpus
    expected = make_malformed_corpus(tmp_path / "corpus")

Keys are paths relative to the root (posix separators; the non-UTF-8 name is a str carrying
surrogate escapes, as `os.fsdecode` gives it). Values:

- "ok"            a usable image (record present)
- "duplicate"     identical bytes to an "ok" file with the same label: dropped, listed in duplicates
- "ignored"       hidden or non-image file: neither a record nor an exclusion
- "empty_class"   a class folder with no images: listed in the card's empty_classes
- anything else   the `ExcludedFile.code` intake must report

Everything is tiny (a few KB in total, apart from an ~11 KB 1-bit PNG) and fast to write.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog")
N_VALID = 6  # plain valid images per class
EXIF_SIZE = (40, 20)  # stored size of the EXIF-rotated JPEG (orientation 6 -> displayed 20x40)
LONG_NAME = "long_" + "x" * 190 + ".jpg"  # ~200 characters, under the usual 255-byte limit
NON_UTF8_NAME = b"caf\xe9_latin1.jpg"


def _encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _noise(seed: int, size: tuple[int, int] = (32, 24), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def forged_bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A ~60-byte PNG whose header declares width x height pixels (PIL raises DecompressionBombError)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _png_chunk(b"IEND", b""))


def huge_one_bit_png(side: int = 9_500) -> bytes:
    """A genuine 1-bit PNG of side x side pixels (90 M > PIL's 89.5 M limit) that compresses to ~11 KB."""
    return _encode(Image.new("1", (side, side), 0), "PNG", optimize=False)


def make_malformed_corpus(root: Path) -> dict[str, str]:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}

    def write(rel: str, data: bytes, outcome: str) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[rel] = outcome

    for ci, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(N_VALID):
            seed = 1000 * (ci + 1) + i
            if i % 2:
                write(f"{cls}/valid_{i}.png", _encode(_noise(seed), "PNG"), "ok")
            else:
                write(f"{cls}/valid_{i}.jpg", _encode(_noise(seed), "JPEG", quality=90), "ok")

    good_jpeg = _encode(_noise(7, (64, 48)), "JPEG", quality=95)

    # --- broken files
    corrupt = bytearray(good_jpeg)
    corrupt[200:] = np.random.default_rng(8).integers(0, 256, len(corrupt) - 200, dtype=np.uint8).tobytes()
    write("cat/corrupt.jpg", bytes(corrupt), "corrupt")
    ramp = np.add.outer(np.arange(48), np.arange(64)).astype(np.uint8) * 2
    broken_png = bytearray(_encode(Image.fromarray(np.stack([ramp, ramp[::-1], ramp // 2], -1)), "PNG"))
    # garbage inside the compressed IDAT stream: the header opens fine, PIL decodes black pixels
    # without complaint, only the chunk CRC tells
    broken_png[60:90] = np.random.default_rng(21).integers(0, 256, 30, dtype=np.uint8).tobytes()
    write("cat/corrupt_data.png", bytes(broken_png), "corrupt")
    write("cat/truncated.jpg", good_jpeg[: len(good_jpeg) // 2], "truncated")
    write("cat/zero_bytes.jpg", b"", "empty")
    write("cat/text_named.jpg", b"this is a text file, not a JPEG\n" * 4, "not_image")
    write("cat/bomb.png", forged_bomb_png(), "too_many_pixels")
    # rich markup in a file name: the card must list it under its own name, not style it away
    write("dog/[bold]markup[.jpg", good_jpeg[: len(good_jpeg) // 3], "truncated")
    write("dog/huge_dimensions.png", huge_one_bit_png(), "too_many_pixels")

    # --- odd but valid files: must come back as RGB
    write("cat/cmyk.jpg", _encode(Image.new("CMYK", (32, 24), (0, 255, 255, 0)), "JPEG", quality=95), "ok")
    gradient = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    write("cat/gray16.png", _encode(Image.fromarray(gradient), "PNG"), "ok")
    pal_idx = np.zeros((24, 32), np.uint8)
    pal_idx[:, 16:] = 1
    pal = Image.fromarray(pal_idx, "P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    write("cat/palette_transparent.png", _encode(pal, "PNG", transparency=0), "ok")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    write("dog/exif_rotated.jpg", _encode(_noise(9, EXIF_SIZE), "JPEG", quality=95, exif=exif), "ok")
    frames = [Image.new("RGB", (32, 24), c) for c in ((250, 10, 10), (10, 250, 10), (10, 10, 250))]
    write("dog/animated.gif", _encode(frames[0], "GIF", save_all=True, append_images=frames[1:],
                                      duration=80, loop=0), "ok")
    write("dog/animated.webp", _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:],
                                       duration=80, loop=0, lossless=True), "ok")
    write("dog/grayscale.jpg", _encode(_noise(10, mode="L"), "JPEG", quality=90), "ok")
    write("dog/la_alpha.png", _encode(Image.new("LA", (32, 24), (90, 0)), "PNG"), "ok")
    write("dog/bitmap.bmp", _encode(_noise(11), "BMP"), "ok")
    write("dog/" + LONG_NAME, _encode(_noise(12), "JPEG", quality=90), "ok")

    # --- same bytes: two labels -> conflict; same label -> kept once
    shared = _encode(_noise(13), "PNG")
    write("cat/conflict.png", shared, "label_conflict")
    write("dog/conflict.png", shared, "label_conflict")
    dup = _encode(_noise(14), "PNG")
    write("dog/dup_a.png", dup, "ok")
    write("dog/dup_b.png", dup, "duplicate")

    # --- layout oddities
    (root / "empty_class").mkdir()
    expected["empty_class"] = "empty_class"
    write("cat/.hidden.jpg", _encode(_noise(15), "JPEG"), "ignored")
    write(".hidden_dir/cat.jpg", _encode(_noise(16), "JPEG"), "ignored")
    write("cat/notes.txt", b"not an image\n", "ignored")
    write("loose_at_root.jpg", _encode(_noise(17), "JPEG"), "unlabelled")
    write("cat/nested/deeper/nested_ok.png", _encode(_noise(18), "PNG"), "ok")

    os.symlink("..", root / "cat" / "loop")  # cat/loop -> root: a directory cycle
    expected["cat/loop"] = "symlink_loop"
    os.symlink("self_loop.jpg", root / "dog" / "self_loop.jpg")  # ELOOP on open
    expected["dog/self_loop.jpg"] = "unreadable"

    try:  # some filesystems refuse non-UTF-8 names
        raw = os.fsencode(root / "dog") + b"/" + NON_UTF8_NAME
        with open(raw, "wb") as fh:
            fh.write(_encode(_noise(19), "JPEG", quality=90))
        expected["dog/" + os.fsdecode(NON_UTF8_NAME)] = "ok"
    except (OSError, UnicodeError):
        pass
    return expected


# ----------------------------------------------------------------------------- whole-job corpora

RUN_CLASSES = ("cat", "dog", "frog")
_TILE_COLOURS = {"cat": (200, 60, 50), "dog": (50, 170, 70), "frog": (60, 70, 210)}


def colour_tile(cls: str, seed: int, size: int = 40, fmt: str = "PNG") -> bytes:
    """A small noisy tile in the class's colour: classes a real backbone tells apart."""
    rng = np.random.default_rng(seed)
    base = np.array(_TILE_COLOURS[cls], dtype=np.float64)
    arr = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    kwargs = {"quality": 92} if fmt == "JPEG" else {}
    return _encode(Image.fromarray(arr), fmt, **kwargs)


def make_run_corpus(root: Path, *, tiles_per_class: int = 8) -> dict[str, str]:
    """The malformed corpus plus `tiles_per_class` separable good images in each of three classes
    (`cat`, `dog` and a third, `frog`, that holds only good images): a dataset `tlpipe run` must
    complete on, excluding every bad file with its reason. Same outcome map as
    `make_malformed_corpus`."""
    root = Path(root)
    expected = make_malformed_corpus(root)
    for ci, cls in enumerate(RUN_CLASSES):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(tiles_per_class):
            fmt = "JPEG" if i % 2 else "PNG"
            rel = f"{cls}/tile_{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
            (root / rel).write_bytes(colour_tile(cls, 50_000 + 100 * ci + i, fmt=fmt))
            expected[rel] = "ok"
    return expected


def write_manifest(path: Path, rows: list[tuple[str, str]]) -> Path:
    """A `path,label` CSV manifest (paths written as given, relative to the manifest's folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["path,label"] + [f"{p},{label}" for p, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_unworkable_datasets(root: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """Datasets no classifier can be trained on: {case: (path to pass, words the one-line error
    must contain)}. Each must make `tlpipe run` / `tlpipe validate` fail early and cleanly."""
    root = Path(root)
    cases: dict[str, tuple[Path, tuple[str, ...]]] = {}

    single = root / "single_class"
    (single / "only").mkdir(parents=True)
    for i in range(4):
        (single / "only" / f"{i}.png").write_bytes(colour_tile("cat", i))
    cases["single_class"] = (single, ("only one class", "at least two"))

    all_bad = root / "all_bad"
    for cls in ("a", "b"):
        (all_bad / cls).mkdir(parents=True)
        (all_bad / cls / "zero.jpg").write_bytes(b"")
        (all_bad / cls / "text.jpg").write_bytes(b"not an image at all\n")
        (all_bad / cls / "bomb.png").write_bytes(forged_bomb_png())
    cases["all_bad"] = (all_bad, ("no usable images", "empty", "not_image", "too_many_pixels"))

    empty = root / "empty_folder"
    empty.mkdir()
    cases["empty_folder"] = (empty, ("no image files",))

    # every manifest row points outside the manifest's folder
    outside = root / "outside"
    outside.mkdir()
    for cls in ("a", "b"):
        (outside / f"{cls}.png").write_bytes(colour_tile("dog", ord(cls)))
    escaping = root / "escaping" / "sub"
    escaping.mkdir(parents=True)
    os.symlink(outside / "a.png", escaping / "link_out.png")
    manifest = write_manifest(escaping / "manifest.csv", [
        ("../../outside/a.png", "a"), ("../../outside/b.png", "b"),
        (str(outside / "a.png"), "a"), ("link_out.png", "b"),
    ])
    cases["manifest_escapes_root"] = (manifest, ("no usable images", "outside_root"))

    # a dataset folder whose class folders are all links back into the tree
    loops = root / "symlink_loops"
    loops.mkdir()
    os.symlink(".", loops / "a")
    os.symlink("..", loops / "b")
    cases["symlink_loop_dir"] = (loops, ("symlink_loop",))

    # the dataset path itself is a link to itself (ELOOP)
    self_link = root / "self_link"
    os.symlink(self_link.name, self_link)
    cases["self_link"] = (self_link, ("symbolic link",))
    return cases
