"""tagd.arrivals: which message's arrival a window's capture time comes from."""

from tagd.arrivals import Arrival, CaptureTimes

MODEL_RATE = 12_000
INPUT_RATE = 48_000  # four input frames per output sample


def arrival(t: float) -> Arrival:
    return Arrival(1000.0 + t, t)


def test_a_window_is_captured_when_the_message_with_its_last_sample_arrived():
    times = CaptureTimes(MODEL_RATE)
    for k in range(4):  # a second apart, messages of 4,800 input frames = 1,200 output samples each
        times.note(4_800, arrival(k))
    # the window ending at output sample 2,400 ends in the second message (frames 4,800..9,599)
    assert times.captured(2_400, INPUT_RATE, completed=arrival(9.0)) == arrival(1)
    # the next one ends in the fourth; the arrivals before it are forgotten: state stays small
    assert times.captured(4_800, INPUT_RATE, completed=arrival(9.0)) == arrival(3)
    assert len(times) == 1


def test_after_a_restart_only_the_new_epochs_arrivals_count():
    times = CaptureTimes(MODEL_RATE)
    times.note(4_800, arrival(0.0))
    times.restart(start=50_000)  # stream time goes on; the resampler starts afresh
    assert len(times) == 0
    times.note(4_800, arrival(5.0))
    assert times.captured(50_000 + 1_200, INPUT_RATE, completed=arrival(9.0)) == arrival(5.0)


def test_without_a_known_arrival_the_completing_message_counts():
    times = CaptureTimes(MODEL_RATE)
    assert times.captured(1_200, INPUT_RATE, completed=arrival(2.0)) == arrival(2.0)
