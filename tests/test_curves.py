"""curves.png: drawn from the run's numbers, a real PNG, replaced atomically."""

from __future__ import annotations

import struct

import pytest

pytest.importorskip("matplotlib")

from finetune.curves import write_curves  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def plotted(fig) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """{panel y-label: {line label: (x, y)}} read back from the figure."""
    return {
        ax.get_ylabel(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}
        for ax in fig.axes
    }


def test_curves_plot_the_given_series_into_a_png(tmp_path):
    losses = [[1, 2.5], [2, 2.1], [3, 1.7], [4, 1.6]]
    evals = [[2, 2.3], [4, 1.9]]
    lrs = [[1, 1e-4], [2, 2e-4], [3, 1.5e-4], [4, 0.5e-4]]
    tps = [[1, 900.0], [2, 1100.0], [3, 1050.0], [4, 1000.0]]
    out = tmp_path / "run" / "curves.png"
    fig = write_curves(out, losses, evals, lrs=lrs, tokens_per_s=tps)

    assert png_size(out) == (800, 3 * 260)  # figsize 8 x 2.6 per panel at 100 dpi
    lines = plotted(fig)
    assert list(lines) == ["loss", "learning rate", "tokens/s"]
    assert lines["loss"]["train"] == ([1, 2, 3, 4], [2.5, 2.1, 1.7, 1.6])
    assert lines["loss"]["eval"] == ([2, 4], [2.3, 1.9])
    assert lines["learning rate"]["lr"][1] == [1e-4, 2e-4, 1.5e-4, 0.5e-4]
    assert lines["tokens/s"]["tokens/s"][1] == [900.0, 1100.0, 1050.0, 1000.0]
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"], "the temporary file was left behind"


def test_curves_without_eval_or_lr_still_draw_the_loss_and_replace_the_old_png(tmp_path):
    out = tmp_path / "curves.png"
    write_curves(out, [[1, 3.0], [2, 2.0]], [], lrs=[[1, 1e-3], [2, 1e-3]])
    first = out.read_bytes()
    fig = write_curves(out, [[1, 3.0], [2, 2.0], [3, 1.0]], [])
    assert out.read_bytes() != first
    assert png_size(out) == (800, 260)
    assert plotted(fig) == {"loss": {"train": ([1, 2, 3], [3.0, 2.0, 1.0])}}


def test_dpo_extra_panels_show_rewards_and_margin(tmp_path):
    extra = {
        "rewards": {"chosen": [[1, 0.1], [2, 0.3]], "rejected": [[1, -0.1], [2, -0.4]]},
        "margin": {"margin": [[1, 0.2], [2, 0.7]]},
        "empty panel": {"nothing": []},
    }
    fig = write_curves(tmp_path / "curves.png", [[1, 0.69], [2, 0.5]], [[2, 0.55]], extra=extra)
    lines = plotted(fig)
    assert list(lines) == ["loss", "rewards", "margin"]
    assert lines["rewards"]["chosen"] == ([1, 2], [0.1, 0.3])
    assert lines["rewards"]["rejected"] == ([1, 2], [-0.1, -0.4])
    assert lines["margin"]["margin"][1] == [0.2, 0.7]
    assert png_size(tmp_path / "curves.png") == (800, 3 * 260)
