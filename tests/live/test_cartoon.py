"""`cartoon`'s look: flat colour bands, and ink where the grey level changes by more than
`edge_threshold` from one pixel to the next."""

from __future__ import annotations

import numpy as np

from live.pipelines.effects import CartoonParams, CartoonPipeline


def step_image(left: tuple[int, int, int], right: tuple[int, int, int]) -> np.ndarray:
    image = np.empty((8, 16, 3), np.uint8)
    image[:, :8] = left
    image[:, 8:] = right
    return image


def test_edges_are_inked_where_the_grey_step_exceeds_the_threshold() -> None:
    cartoon = CartoonPipeline(CartoonParams(edge_threshold=24.0))
    # Grey steps of exactly 24 (not above the threshold) and 25, split over the channels.
    below = cartoon.process(step_image((100, 100, 100), (124, 124, 124)))
    above = cartoon.process(step_image((100, 100, 100), (110, 140, 125)))
    assert not (below == 0).all(axis=2).any()
    inked = (above == 0).all(axis=2)
    assert inked[:, 8].all() and inked.sum() == 8  # the column where the step is, only


def test_colours_fall_into_bands_and_strength_mixes_the_input_back() -> None:
    image = step_image((10, 130, 250), (10, 130, 250))
    full = CartoonPipeline(CartoonParams(levels=4)).process(image)
    assert (full == [32, 160, 224]).all()  # the centres of 4 bands of 64
    none = CartoonPipeline(CartoonParams(levels=4, strength=0.0)).process(image)
    assert (none == image).all()
