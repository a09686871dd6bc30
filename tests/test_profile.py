"""Properties of the ablation-weight profiles, checked over random parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from optimizer.engine.profile import SHAPES, layer_weights, weight_at

shapes = st.sampled_from(SHAPES)
n_layers = st.integers(1, 128)
weights = st.floats(0.0, 5.0, allow_nan=False)
distances = st.floats(0.05, 150.0, allow_nan=False)
positions = st.floats(-10.0, 140.0, allow_nan=False)


@st.composite
def profiles(draw):
    """(shape, n_layers, max_weight, position, min_weight, distance)."""
    return (draw(shapes), draw(n_layers), draw(weights), draw(positions), draw(weights), draw(distances))


@given(profiles())
def test_length_dtype_and_finite(args):
    w = layer_weights(*args)
    assert w.shape == (args[1],)
    assert w.dtype == np.float32
    assert np.isfinite(w).all()


@given(profiles())
def test_bounded_by_end_points_and_zero(args):
    shape, n, max_w, pos, min_w, dist = args
    w = layer_weights(*args)
    assert w.max() <= np.float32(max(max_w, min_w, 0.0))
    assert w.min() >= np.float32(min(max_w, min_w, 0.0))


@given(shapes, n_layers, weights, st.data(), weights, distances)
def test_peak_at_integer_position(shape, n, max_w, data, min_w, dist):
    pos = data.draw(st.integers(0, n - 1))
    w = layer_weights(shape, n, max_w, pos, min_w, dist)
    assert w[pos] == np.float32(max_w)


@given(shapes, n_layers, weights, st.data(), weights, st.integers(1, 130))
def test_min_weight_exactly_at_distance_and_zero_beyond(shape, n, max_w, data, min_w, dist):
    pos = data.draw(st.integers(0, n - 1))
    w = layer_weights(shape, n, max_w, pos, min_w, float(dist))
    for layer in (pos - dist, pos + dist):
        if 0 <= layer < n:
            assert w[layer] == np.float32(min_w)
    far = np.abs(np.arange(n) - pos) > dist
    assert (w[far] == 0).all()


@given(profiles())
def test_zero_beyond_distance_any_position(args):
    shape, n, max_w, pos, min_w, dist = args
    w = layer_weights(*args)
    assert (w[np.abs(np.arange(n) - pos) > dist] == 0).all()


@given(shapes, st.integers(1, 64), weights, weights, distances, st.booleans())
def test_symmetric_about_position(shape, half, max_w, min_w, dist, odd):
    # A model with the peak exactly in the middle (on a layer, or between two layers) must
    # give a palindromic profile.
    n = 2 * half + (1 if odd else 0)
    pos = (n - 1) / 2
    w = layer_weights(shape, n, max_w, pos, min_w, dist)
    np.testing.assert_array_equal(w, w[::-1])


@given(shapes, st.floats(0, 200), weights, weights, distances)
def test_continuous_form_symmetric_in_distance(shape, d, max_w, min_w, dist):
    assert weight_at(shape, d, max_w, min_w, dist) == weight_at(shape, -d, max_w, min_w, dist)


@given(shapes, weights, weights, distances)
def test_monotone_from_peak_to_end(shape, max_w, min_w, dist):
    w = weight_at(shape, np.linspace(0, dist, 257), max_w, min_w, dist)
    steps = np.diff(w) * np.sign(min_w - max_w)  # all ≥ 0 when moving towards min_weight
    assert (steps >= -1e-12).all()


@given(weights, weights, distances, st.floats(0, 1))
def test_tent_is_linear(max_w, min_w, dist, t):
    got = weight_at("tent", t * dist, max_w, min_w, dist)
    assert math.isclose(float(got), max_w + t * (min_w - max_w), rel_tol=1e-12, abs_tol=1e-12)


@given(shapes, weights, weights, distances, st.floats(0, 1), st.floats(0, 1))
def test_lipschitz_inside_the_support(shape, max_w, min_w, dist, a, b):
    # Continuity with a bounded slope: |Δw| ≤ k·|max − min|/dist·|Δd|, where the steepest
    # slope is 1 for the tent and π/2 for the bell.
    k = 1.0 if shape == "tent" else math.pi / 2
    wa, wb = weight_at(shape, np.array([a * dist, b * dist]), max_w, min_w, dist)
    bound = k * abs(max_w - min_w) / dist * abs(a - b) * dist
    assert abs(wa - wb) <= bound + 1e-9


@given(weights, weights, distances)
def test_bell_is_flat_at_peak_and_end(max_w, min_w, dist):
    # Zero derivative at both ends of the fall: a step of h moves the weight by O(h²).
    # Bound: |w''| ≤ (π/dist)²·|max − min|/2, so |Δw| ≤ (π·h/dist)²·|max − min|/4.
    assume(abs(max_w - min_w) > 1e-3)
    for h in (1e-3, 1e-4):
        step = h * dist
        bound = (math.pi * h) ** 2 * abs(max_w - min_w) / 4 + 1e-12
        at_peak = weight_at("bell", np.array([0.0, step]), max_w, min_w, dist)
        at_end = weight_at("bell", np.array([dist - step, dist]), max_w, min_w, dist)
        assert abs(at_peak[1] - at_peak[0]) <= bound
        assert abs(at_end[1] - at_end[0]) <= bound


@given(weights, weights, distances)
def test_tent_has_constant_slope_at_peak(max_w, min_w, dist):
    step = 1e-3 * dist
    w0, w1 = weight_at("tent", np.array([0.0, step]), max_w, min_w, dist)
    assert math.isclose((w1 - w0) / step, (min_w - max_w) / dist, rel_tol=1e-6, abs_tol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_share_end_points_and_differ_between(shape):
    w = layer_weights(shape, 9, 1.5, 4, 0.5, 4)
    assert w[4] == np.float32(1.5)
    assert w[0] == w[8] == np.float32(0.5)
    tent = layer_weights("tent", 9, 1.5, 4, 0.5, 4)
    np.testing.assert_allclose(tent, [0.5, 0.75, 1.0, 1.25, 1.5, 1.25, 1.0, 0.75, 0.5])
    bell = layer_weights("bell", 9, 1.5, 4, 0.5, 4)
    assert bell[3] > tent[3] and bell[1] < tent[1]  # flatter near the peak, lower near the end


def test_single_layer():
    assert layer_weights("bell", 1, 1.2, 0.0, 0.3, 1.0).tolist() == [pytest.approx(1.2)]
    assert layer_weights("tent", 1, 1.2, 5.0, 0.3, 1.0).tolist() == [0.0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shape="cone"), "unknown profile shape"),
        (dict(n_layers=0), "n_layers"),
        (dict(n_layers=2.0), "n_layers"),
        (dict(min_weight_distance=0.0), "min_weight_distance"),
        (dict(min_weight_distance=-1.0), "min_weight_distance"),
        (dict(min_weight_distance=math.inf), "min_weight_distance"),
        (dict(max_weight=math.nan), "finite"),
        (dict(max_weight_position=math.nan), "max_weight_position"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = dict(
        shape="bell", n_layers=8, max_weight=1.0, max_weight_position=6.0,
        min_weight=0.2, min_weight_distance=3.0,
    )
    with pytest.raises(ValueError, match=match):
        layer_weights(**{**args, **kwargs})
