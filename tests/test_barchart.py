"""Bar charts are PNGs of the size their bars need, with the bars where their values put them."""
from PIL import Image

from cofx.barchart import bar_chart, bar_rows


def test_bar_rows_draw_one_row_per_bar_on_a_log_scale(tmp_path):
    bars = [(f"bar {i}", 10.0 ** i, 0.8 * 10.0 ** i, 1.2 * 10.0 ** i) for i in range(4)]
    few, many = tmp_path / "few.png", tmp_path / "many.png"
    bar_rows(few, bars[:2], "t", "ms")
    bar_rows(many, bars, "t", "ms")
    with Image.open(few) as a, Image.open(many) as b:
        assert a.format == b.format == "PNG" and a.width == b.width and b.height - a.height == 2 * 20
        # on a log scale each tenfold value ends its bar the same distance further right
        ends = [_bar_end(b.convert("RGB"), 50 + 20 * i + 10) for i in range(4)]
    steps = [e - s for s, e in zip(ends, ends[1:])]
    assert max(steps) - min(steps) <= 2 and steps[0] > 50


def _bar_end(img, y: int) -> int:
    """The rightmost coloured (not white, grey or black) pixel of row `y`, left of the value labels."""
    coloured = [x for x in range(250, img.width) if len(set(img.getpixel((x, y)))) > 1]   # greys are r = g = b
    return max(coloured)


def test_bar_chart_draws_a_few_bars(tmp_path):
    path = tmp_path / "chart.png"
    bar_chart(path, [("a", 1.0, 0.9, 1.1), ("b", 2.0, 1.8, 2.2)], "t", "ms", note="n")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (720, 440)
