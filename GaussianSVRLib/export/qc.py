"""Quality control for people: a short table of a reconstruction report, and a PNG of rejected slices.

The PNG has, under a title (and, when the stacks could not be brought together, a red line that says
so) and a colour legend, one block per stack: its verdict; a strip of bars,
one per slice along the stack (k = 0 on the left), as high as the slice's weight (0..1), drawn full
height in the colour of the reason when the slice was rejected; then a thumbnail pair for each
rejected slice, observed | predicted by the reconstruction, framed in the reason's colour and
labelled with the slice index and the reason. Thumbnails show the slice's brain-mask pixels in the
stack's voxel order (rows j, columns i) with square millimetres; the prediction is shown at its
stack's median intensity scale, so a signal drop-out looks dark beside a normal prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..fit.quality import REASON_WORDS
from ..io.outputs import write_png
from ..io.slices import SliceSet
from ..io.stacks import Stack
from .montage import _title_banner

#: Width of the QC image in pixels.
QC_WIDTH = 900
#: Largest side of one thumbnail (observed or predicted) in pixels.
THUMBNAIL = 96
#: Frame width around a thumbnail pair, and the gaps between pairs and inside a pair.
FRAME = 3
GAP = 6
MARGIN = 8
#: Height of the weight strip; its bars are at least this wide apart from their one-pixel gap.
STRIP_HEIGHT = 32
MAX_BAR_WIDTH = 24
#: Rejected slices shown per stack; the others are counted in a line below them.
MAX_THUMBNAILS = 16
#: Colours (RGB) of the reasons, of kept slices' weight bars and of the strip's background.
REASON_COLOURS = {"motion": (230, 40, 40), "dropout": (255, 160, 0), "intensity": (210, 70, 230)}
BAR_COLOUR = (200, 200, 200)
STRIP_BACKGROUND = (45, 45, 45)
WHITE = (255, 255, 255)
NOT_ALIGNED = (255, 70, 70)


def summary_table(report: dict[str, Any]) -> str:
    """A short plain-text table: one line per stack with its verdict, then the rejected slices by stack."""
    lines = [f"{'stack':<6}{'slices':>7}{'rejected':>10}{'residual':>10}{'agreement':>11}  verdict"]
    for index, stack in enumerate(report["stacks"]):
        residual, agreement = stack["mean_residual"], stack.get("agreement")
        lines.append(
            f"{index + 1:<6}{stack['n_slices']:>7}{stack['n_excluded']:>10}"
            f"{'n/a' if residual is None else f'{residual:.3f}':>10}"
            f"{'n/a' if agreement is None else f'{agreement:.2f}':>11}  {stack['verdict']}"
        )
    for index in range(len(report["stacks"])):
        rejected = [item for item in report["slices"] if item["excluded"] and item["stack"] == index]
        if rejected:
            listed = ", ".join(f"{item['k']} ({reason_words(item)})" for item in rejected)
            lines.append(f"  stack {index + 1} rejected slices: {listed}")
    verdict = report.get("verdict", {})
    if verdict.get("status") == "not_aligned":
        text = verdict["text"]
        lines.append(text[:1].upper() + text[1:])  # str.capitalize would lower the later sentences
    return "\n".join(lines)


def reason_words(item: dict[str, Any]) -> str:
    """The plain-language reason of a rejected slice's report entry."""
    code = item.get("reason_code")
    return REASON_WORDS.get(code, code) if code else "rejected"


def text_image(text: str, colour: tuple[int, int, int] = WHITE, width: int | None = None) -> np.ndarray:
    """One line of text (rows, cols, 3) uint8 on black; trimmed to the ink (plus a margin) unless a width
    is given."""
    ink = _title_banner(text, width or QC_WIDTH)
    if width is None:
        used = np.nonzero(ink.any(axis=0))[0]
        ink = ink[:, : (used[-1] + 5 if used.size else 1)]
    return (ink[..., None].astype(np.float32) * np.asarray(colour, np.float32) / 255.0).astype(np.uint8)


def place(canvas: np.ndarray, tile: np.ndarray, row: int, column: int) -> None:
    """Copy tile into canvas at (row, column), clipped to the canvas."""
    rows = min(tile.shape[0], canvas.shape[0] - row)
    columns = min(tile.shape[1], canvas.shape[1] - column)
    canvas[row : row + rows, column : column + columns] = tile[:rows, :columns]


def stack_column(tiles: list[np.ndarray], width: int = QC_WIDTH) -> np.ndarray:
    """Tiles stacked top to bottom on a black canvas of the given width (left-aligned)."""
    canvas = np.zeros((sum(tile.shape[0] for tile in tiles), width, 3), dtype=np.uint8)
    row = 0
    for tile in tiles:
        place(canvas, tile, row, 0)
        row += tile.shape[0]
    return canvas


def weight_strip(n_k: int, k: np.ndarray, weight: np.ndarray, codes: list[str | None]) -> np.ndarray:
    """Bars (STRIP_HEIGHT, QC_WIDTH, 3) along k = 0..n_k-1: kept slices as high as their weight,
    rejected ones full height in their reason's colour; slices without brain pixels leave a gap."""
    strip = np.zeros((STRIP_HEIGHT, QC_WIDTH, 3), dtype=np.uint8)
    bar = max(1, min(MAX_BAR_WIDTH, (QC_WIDTH - 2 * MARGIN) // max(n_k, 1)))
    strip[:, MARGIN : MARGIN + bar * n_k] = STRIP_BACKGROUND
    for kk, w, code in zip(k, weight, codes, strict=True):
        left = MARGIN + int(kk) * bar
        right = left + max(1, bar - 1)
        if code is not None:
            strip[:, left:right] = REASON_COLOURS.get(code, WHITE)
        else:
            height = int(round(float(np.clip(w, 0.0, 1.0)) * STRIP_HEIGHT))
            strip[STRIP_HEIGHT - height :, left:right] = BAR_COLOUR
    return strip


def slice_plane(stack: Stack, flat: np.ndarray, values: np.ndarray, box: tuple[slice, slice]) -> np.ndarray:
    """One slice's pixels (flat indices (n,) into the stack array, values (n,)) as a 2-D array (j, i)
    cut to box, zero off the mask."""
    _, nj, ni = stack.data.shape
    plane = np.zeros((nj, ni), dtype=np.float32)
    plane[(flat // ni) % nj, flat % ni] = values
    return plane[box]


def to_thumbnail(plane: np.ndarray, spacing_ji: tuple[float, float], high: float) -> np.ndarray:
    """A plane (j, i) windowed to [0, high] and resampled (nearest) to square pixels, longest side
    THUMBNAIL, centred on a black (THUMBNAIL, THUMBNAIL) uint8 square."""
    extent = np.array(plane.shape) * np.asarray(spacing_ji)
    step = float(extent.max()) / THUMBNAIL
    size = np.maximum(np.round(extent / step).astype(int), 1)
    rows = np.minimum(((np.arange(size[0]) + 0.5) * step / spacing_ji[0]).astype(int), plane.shape[0] - 1)
    columns = np.minimum(((np.arange(size[1]) + 0.5) * step / spacing_ji[1]).astype(int), plane.shape[1] - 1)
    scaled = np.clip(plane[np.ix_(rows, columns)] / high if high > 0 else 0.0, 0.0, 1.0)
    square = np.zeros((THUMBNAIL, THUMBNAIL), dtype=np.uint8)
    top, left = (THUMBNAIL - size[0]) // 2, (THUMBNAIL - size[1]) // 2
    square[top : top + size[0], left : left + size[1]] = np.round(scaled * 255.0).astype(np.uint8)
    return square


def thumbnail_pair(observed: np.ndarray, predicted: np.ndarray, label: str, code: str | None) -> np.ndarray:
    """observed | predicted (THUMBNAIL squares, uint8) in a frame of the reason's colour, label below."""
    colour = REASON_COLOURS.get(code or "", WHITE)
    width = 2 * THUMBNAIL + 2 + 2 * FRAME
    tile = np.zeros((THUMBNAIL + 2 * FRAME, width, 3), dtype=np.uint8)
    tile[:] = colour
    tile[FRAME:-FRAME, FRAME : FRAME + THUMBNAIL] = observed[..., None]
    tile[FRAME:-FRAME, FRAME + THUMBNAIL : FRAME + THUMBNAIL + 2] = 0
    tile[FRAME:-FRAME, FRAME + THUMBNAIL + 2 : -FRAME] = predicted[..., None]
    return np.vstack([tile, text_image(label, colour, width)])


def tile_rows(tiles: list[np.ndarray]) -> np.ndarray:
    """Equal-sized tiles left to right, wrapped to QC_WIDTH, GAP apart."""
    height, width = tiles[0].shape[:2]
    per_row = max(1, (QC_WIDTH - 2 * MARGIN + GAP) // (width + GAP))
    n_rows = -(-len(tiles) // per_row)
    canvas = np.zeros((n_rows * (height + GAP), QC_WIDTH, 3), dtype=np.uint8)
    for n, tile in enumerate(tiles):
        row, column = divmod(n, per_row)
        place(canvas, tile, row * (height + GAP), MARGIN + column * (width + GAP))
    return canvas


def stack_block(
    index: int,
    stack: Stack,
    report: dict[str, Any],
    slices: SliceSet,
    predicted: np.ndarray,
) -> np.ndarray:
    """One stack's verdict, weight strip and rejected-slice thumbnails (rows, QC_WIDTH, 3)."""
    items = report["slices"]
    ids = [i for i, item in enumerate(items) if item["stack"] == index]
    tiles = [text_image(report["stacks"][index]["verdict"], width=QC_WIDTH)]
    tiles.append(
        weight_strip(
            stack.n_slices,
            np.array([items[i]["k"] for i in ids]),
            np.array([items[i]["weight"] for i in ids]),
            [items[i]["reason_code"] if items[i]["excluded"] else None for i in ids],
        )
    )
    tiles.append(np.zeros((GAP, QC_WIDTH, 3), dtype=np.uint8))
    rejected = [i for i in ids if items[i]["excluded"]]
    if not rejected:
        tiles.append(text_image("no slice rejected", width=QC_WIDTH))
        return stack_column(tiles)
    on_stack = np.isin(slices.pixel_slice, ids)
    _, nj, ni = stack.data.shape
    flat = slices.pixel_index[on_stack]
    rows, columns = (flat // ni) % nj, flat % ni
    box = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(columns.min()), int(columns.max()) + 1))
    high = float(np.percentile(slices.values[on_stack], 99.0)) if on_stack.any() else 1.0
    median_scale = float(np.median([items[i]["scale"] for i in ids]))
    spacing_ji = (float(stack.spacing[1]), float(stack.spacing[0]))
    pairs = []
    for m in rejected[:MAX_THUMBNAILS]:
        pixels = slices.pixel_slice == m
        flat_m = slices.pixel_index[pixels]
        at_median = predicted[pixels] * median_scale / max(items[m]["scale"], 1e-12)
        observed = to_thumbnail(slice_plane(stack, flat_m, slices.values[pixels], box), spacing_ji, high)
        expected = to_thumbnail(slice_plane(stack, flat_m, at_median, box), spacing_ji, high)
        label = f"slice {items[m]['k']}: {reason_words(items[m])}"
        pairs.append(thumbnail_pair(observed, expected, label, items[m]["reason_code"]))
    tiles.append(tile_rows(pairs))
    if len(rejected) > MAX_THUMBNAILS:
        more = f"and {len(rejected) - MAX_THUMBNAILS} more rejected slices (see the JSON report)"
        tiles.append(text_image(more, width=QC_WIDTH))
    return stack_column(tiles)


def legend() -> np.ndarray:
    """Two lines: what the strip and thumbnails show, and the colour of each reason."""
    pieces = [text_image("rejected for:")] + [
        text_image(words, REASON_COLOURS[code]) for code, words in REASON_WORDS.items()
    ]
    height = max(piece.shape[0] for piece in pieces)
    line = np.zeros((height, QC_WIDTH, 3), dtype=np.uint8)
    column = 0
    for piece in pieces:
        place(line, piece, 0, column)
        column += piece.shape[1] + GAP
    explanation = "bars: slice weight 0..1 along each stack (k = 0 left); thumbnails: observed | predicted"
    return np.vstack([text_image(explanation, width=QC_WIDTH), line])


def qc_image(
    report: dict[str, Any], stacks: list[Stack], slices: SliceSet, predicted: np.ndarray
) -> np.ndarray:
    """The QC picture (rows, QC_WIDTH, 3) uint8 of a report (build_report) on its stacks and slices.

    predicted (P,) is every slice pixel's prediction in the units of slices.values (slice scale
    included), as the optimizer's final pass returns it times the intensity normalization.
    """
    if len(report["slices"]) != slices.n_slices or len(predicted) != slices.n_pixels:
        raise ValueError("the report, the slices and the predictions do not describe the same slices")
    n_rejected = sum(item["excluded"] for item in report["slices"])
    title = (
        f"GaussianSVR quality control: {n_rejected} of {slices.n_slices} slices rejected"
        if n_rejected
        else f"GaussianSVR quality control: no slice rejected ({slices.n_slices} slices)"
    )
    gap = np.zeros((GAP, QC_WIDTH, 3), dtype=np.uint8)
    tiles = [text_image(title, width=QC_WIDTH), *not_aligned_lines(report), legend(), gap]
    for index, stack in enumerate(stacks):
        tiles += [stack_block(index, stack, report, slices, predicted), gap]
    return stack_column(tiles)


def not_aligned_lines(report: dict[str, Any]) -> list[np.ndarray]:
    """The run's failure to bring the stacks together, in red under the title (none when it did)."""
    verdict = report.get("verdict", {})
    if verdict.get("status") != "not_aligned":
        return []
    listed = ", ".join(str(s + 1) for s in verdict["stacks"])
    return [
        text_image(f"The stacks could not be brought together (stacks {listed} agree poorly):", NOT_ALIGNED),
        text_image("the volume is likely blurred or doubled; see the report", NOT_ALIGNED),
    ]


def write_qc_png(
    path: str | Path, report: dict[str, Any], stacks: list[Stack], slices: SliceSet, predicted: np.ndarray
) -> None:
    """Write qc_image as an RGB PNG, atomically."""
    write_png(qc_image(report, stacks, slices, predicted), path)
