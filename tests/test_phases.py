"""tagd.phases: live streams placed once each, spread over the hop."""

from dataclasses import dataclass, field

from tagd.phases import PHASE_WINDOWS, place_live_streams

HOP_S = 3.0
RATE = 12_000


@dataclass
class FakeStream:
    name: str
    completions: list[float]
    live: bool = True
    idle: bool = False
    placed: bool = False
    phase: float | None = None
    delayed: list[int] = field(default_factory=list)

    @property
    def window_times(self) -> list[float]:
        return self.completions

    def delay_next_window(self, samples: int) -> None:
        self.delayed.append(samples)


def test_streams_completing_together_are_moved_apart_once():
    a = FakeStream("a", [99.5, 102.5, 105.5])  # all complete 0.5 s into the hop
    b = FakeStream("b", [99.5, 102.5, 105.5])
    place_live_streams([a, b], HOP_S, RATE)
    assert (a.phase, a.delayed) == (0.5, [0])  # the first keeps its own phase
    assert b.phase == 2.0 and b.delayed == [round(1.5 * RATE)]  # opposite, on the circle
    place_live_streams([a, b], HOP_S, RATE)
    assert a.delayed == [0] and len(b.delayed) == 1  # placed once per epoch


def test_streams_not_live_or_not_yet_measured_are_left_alone():
    burst = FakeStream("burst", [1.0, 1.1, 1.2], live=False)  # faster than real time
    young = FakeStream("young", [1.0] * (PHASE_WINDOWS - 1))
    place_live_streams([burst, young], HOP_S, RATE)
    assert not burst.placed and not young.placed and burst.delayed == young.delayed == []
