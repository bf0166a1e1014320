import numpy as np
import pytest

from hybrid.data.blend import BlendedIndex, blend_schedule


@pytest.mark.parametrize("weights", [[1, 1], [3, 1], [0.5, 0.3, 0.2], [1, 100]])
def test_schedule_proportions(weights):
    n = 5000
    source, draw = blend_schedule(weights, n)
    w = np.asarray(weights) / np.sum(weights)
    for prefix in (10, 137, 1000, n):
        counts = np.bincount(source[:prefix], minlength=len(w))
        assert np.all(np.abs(counts - w * prefix) <= 1.0 + 1e-9), (prefix, counts)
    # draw numbers count each source's samples in order
    for s in range(len(w)):
        assert np.array_equal(draw[source == s], np.arange(np.sum(source == s)))


def test_schedule_is_deterministic_and_megatron_greedy():
    a = blend_schedule([0.6, 0.4], 100)
    b = blend_schedule([3, 2], 100)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # by hand: the source with the largest 0.6*(k+1) - count_0 or 0.4*(k+1) - count_1
    assert a[0][:10].tolist() == [0, 1, 0, 1, 0, 0, 1, 0, 1, 0]


def test_blended_index_continues_across_blocks():
    weights = [0.5, 0.3, 0.2]
    index = BlendedIndex(weights, block=64)
    source, draw = index(np.arange(640))
    counts = np.bincount(source, minlength=3)
    assert np.all(np.abs(counts - np.asarray(weights) * 640) <= 10)
    for s in range(3):  # each source's draws are 0, 1, 2, ... without gaps or repeats
        assert np.array_equal(draw[source == s], np.arange(counts[s]))
    # random access agrees with the sequential view
    picks = np.array([639, 5, 300, 64, 63])
    s2, d2 = index(picks)
    assert np.array_equal(s2, source[picks]) and np.array_equal(d2, draw[picks])


def test_single_source_is_identity():
    source, draw = BlendedIndex([2.0])(np.arange(10))
    assert np.all(source == 0) and draw.tolist() == list(range(10))
    with pytest.raises(ValueError):
        BlendedIndex([1, 0])
