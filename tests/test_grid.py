import pytest
import torch

from rimlens.errors import RimlensInputError
from rimlens.physics import PixelGrid


def test_pixel_centres_and_fov():
    g = PixelGrid(4, 0.5)
    assert g.fov_arcsec == pytest.approx(2.0)
    assert torch.allclose(g.axis(torch.float64), torch.tensor([-0.75, -0.25, 0.25, 0.75], dtype=torch.float64))
    x, y = g.coordinates(torch.float64)
    # x along columns, y along rows, row 0 at the bottom (smallest y)
    assert x[0, 0] == -0.75 and x[0, -1] == 0.75 and x[-1, 0] == -0.75
    assert y[0, 0] == -0.75 and y[-1, 0] == 0.75 and y[0, -1] == -0.75


def test_odd_grid_has_central_pixel_and_to_pixel_inverts():
    g = PixelGrid.from_fov(5, 1.0)
    assert g.pixel_scale_arcsec == pytest.approx(0.2)
    assert g.axis(torch.float64)[2] == 0
    col, row = g.to_pixel(torch.tensor(0.2), torch.tensor(-0.4))
    assert float(col) == pytest.approx(3.0) and float(row) == pytest.approx(0.0)


@pytest.mark.parametrize("n,scale", [(1, 0.1), (8, 0.0), (8, -1.0), (8, float("nan"))])
def test_bad_grid(n, scale):
    with pytest.raises(RimlensInputError):
        PixelGrid(n, scale)
