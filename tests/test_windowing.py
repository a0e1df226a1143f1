import numpy as np
import pytest

from tagd.windowing import (
    ClipTooShortError,
    Windower,
    WindowPool,
    clip_window_starts,
    clip_windows,
    min_clip_samples,
)


def test_windows_start_every_hop_and_hold_the_right_samples():
    samples = np.arange(100, dtype=np.float32)
    windows = list(clip_windows(samples, window_samples=30, hop_samples=20))
    assert [w.start for w in windows] == [0, 20, 40, 60]
    for w in windows:
        np.testing.assert_array_equal(w.samples, samples[w.start : w.start + 30])
        assert w.end == w.start + 30


@pytest.mark.parametrize("chunk", [1, 7, 29, 30, 31, 64, 1000])
def test_any_chunking_gives_identical_windows(chunk):
    rng = np.random.default_rng(0)
    samples = rng.standard_normal(997).astype(np.float32)
    reference = list(clip_windows(samples, 64, 24))
    windower = Windower(64, 24)
    streamed = []
    for first in range(0, len(samples), chunk):
        streamed += windower.push(samples[first : first + chunk])
    assert [w.start for w in streamed] == [w.start for w in reference]
    for a, b in zip(streamed, reference, strict=True):
        np.testing.assert_array_equal(a.samples, b.samples)


def test_hop_longer_than_window_skips_audio():
    samples = np.arange(50, dtype=np.float32)
    windows = list(clip_windows(samples, window_samples=10, hop_samples=15))
    assert [w.start for w in windows] == [0, 15, 30]
    np.testing.assert_array_equal(windows[1].samples, samples[15:25])


def test_windows_are_copies_not_views_of_the_ring():
    windower = Windower(4, 2)
    first = windower.push(np.ones(4, dtype=np.float32))[0]
    windower.push(np.zeros(2, dtype=np.float32))
    np.testing.assert_array_equal(first.samples, np.ones(4))


def test_reset_and_restart_forget_buffered_audio():
    windower = Windower(10, 5)
    windower.push(np.ones(8, dtype=np.float32))
    windower.restart_at(1000)
    assert windower.buffered == 0
    windows = windower.push(np.zeros(10, dtype=np.float32))
    assert [w.start for w in windows] == [1000]
    np.testing.assert_array_equal(windows[0].samples, np.zeros(10))


def test_a_clip_shorter_than_a_window_is_zero_padded_down_to_a_quarter_of_one():
    assert min_clip_samples(100) == 25
    samples = np.arange(1, 41, dtype=np.float32)  # 40 samples, window 100
    (window,) = clip_windows(samples, window_samples=100, hop_samples=30)
    assert window.start == 0
    np.testing.assert_array_equal(window.samples[:40], samples)
    assert not window.samples[40:].any()
    assert list(clip_window_starts(25, 100, 30)) == [0]
    with pytest.raises(ClipTooShortError, match="24 samples is shorter than the minimum of 25"):
        list(clip_windows(np.ones(24, dtype=np.float32), 100, 30))


def test_a_clip_holds_the_windows_a_stream_of_it_would_give():
    """The tail past the last whole window is not scored, as a stream would not yet."""
    for length in (100, 129, 130, 131, 1000):
        streamed = Windower(100, 30).push(np.zeros(length, dtype=np.float32))
        assert list(clip_window_starts(length, 100, 30)) == [w.start for w in streamed]


def test_clip_windows_are_views_not_copies():
    samples = np.arange(1000, dtype=np.float32)
    window = next(clip_windows(samples, 300, 100))
    assert np.shares_memory(window.samples, samples)


def test_pooled_windows_reuse_given_back_buffers_and_hold_the_same_samples():
    rng = np.random.default_rng(1)
    samples = rng.standard_normal(500).astype(np.float32)
    reference = list(clip_windows(samples, 64, 24))
    pool = WindowPool(64, capacity=2)
    windower = Windower(64, 24, pool)
    seen_buffers = set()
    streamed = []
    most_at_once = 0
    for first in range(0, len(samples), 37):
        windows = windower.push(samples[first : first + 37])
        most_at_once = max(most_at_once, len(windows))
        for window in windows:
            streamed.append((window.start, window.samples.copy()))  # what a batch copies
            seen_buffers.add(id(window.samples))
            pool.give(window.samples)  # then nothing reads it: the next window may reuse it
    assert [start for start, _ in streamed] == [w.start for w in reference]
    for (_, got), want in zip(streamed, reference, strict=True):
        np.testing.assert_array_equal(got, want.samples)
    # No more buffers than windows out at once (two when a chunk completes two)
    assert len(streamed) > 10 and len(seen_buffers) == most_at_once == 2


def test_a_pool_keeps_at_most_capacity_and_refuses_foreign_buffers():
    pool = WindowPool(8, capacity=2)
    taken = [pool.take() for _ in range(3)]  # none free: three new buffers
    assert len({id(b) for b in taken}) == 3 and all(b.shape == (8,) for b in taken)
    for buffer in taken:
        pool.give(buffer)
    assert pool.free == 2  # the third is left to the garbage collector
    assert {id(pool.take()), id(pool.take())} <= {id(b) for b in taken}
    with pytest.raises(ValueError, match="not a window of this pool"):
        pool.give(np.zeros(9, dtype=np.float32))
    with pytest.raises(ValueError, match="not a window of this pool"):
        pool.give(np.zeros(8, dtype=np.float64))
    with pytest.raises(ValueError, match="a pool of 8-sample windows for 16"):
        Windower(16, 4, pool)
