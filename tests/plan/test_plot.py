"""The plan's plot files are real PNG and SVG images holding the candidates: the PNG's
header and size, the SVG parsed as XML with a marker and a label per shown candidate."""

import struct
import xml.etree.ElementTree as ET

import pytest

from bloomrun.plan import rules
from bloomrun.plan.fit import Point
from bloomrun.plan.planner import Request, build_plan
from bloomrun.plan.plot import write_plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SVG = "{http://www.w3.org/2000/svg}"


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def svg_parts(path):
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg"
    ids = {el.get("id") for el in root.iter() if (el.get("id") or "").startswith("candidate-")}
    texts = " ".join("".join(el.itertext()) for el in root.iter(f"{SVG}text"))
    return ids, texts


@pytest.fixture(scope="module")
def request_():
    return Request(gpu_hours=1_161_216, gpu="a100-80gb", tflops=150.0, cluster=rules.Cluster(num_gpus=384),
                   min_tokens=350 * 10**9, shapes=((70, 14336, 112),))


def test_gpu_hours_plot_without_runs(tmp_path, request_):
    plan = build_plan(request_)
    png, svg = write_plot(plan, tmp_path)
    assert (png.name, svg.name) == ("gpu-hours-vs-params.png", "gpu-hours-vs-params.svg")
    assert png_size(png) == (990, 660)  # 9 x 6 inches at 110 dpi
    ids, texts = svg_parts(svg)
    shown = {c.label for c in plan.shown()}
    assert len(shown) > 10 and ids == {f"candidate-{label}" for label in shown}
    for label in shown:
        assert label in texts
    assert "budget 1,161,216 GPU-hours" in texts and "minimum: 350.0B tokens" in texts
    assert "compute-optimal size 62.6B" in texts


def test_loss_plot_with_runs_shows_fit_and_candidates(tmp_path, request_):
    points = tuple(Point(c, 60 * c ** -0.05 * (1.01 if i % 2 else 0.99), "arm", i)
                   for i, c in enumerate((1e18, 3e18, 1e19, 3e19, 1e20)))
    plan = build_plan(request_, points)
    png, svg = write_plot(plan, tmp_path)
    assert png.name == "loss-vs-compute.png" and png_size(png) == (990, 660)
    ids, texts = svg_parts(svg)
    assert ids == {f"candidate-{c.label}" for c in plan.shown()}
    assert "95% prediction interval" in texts and "compute frontier (fitted)" in texts
    assert "loss = " in texts and "70x14336x112" in texts
