"""Music-like test audio from numpy alone: chords with harmonics, a drum-ish pulse, noise.

tagd-independent and deterministic for a seed, so any test may import it.
"""

from __future__ import annotations

import numpy as np


def make_music(seconds: float, sample_rate: int, seed: int = 0, level: float = 0.3) -> np.ndarray:
    """Mono float32 ``[round(seconds * sample_rate)]`` in [-1, 1]: chord changes every
    second with three harmonics per note, a decaying noise burst on every beat, a
    rising chirp and a little broadband noise."""
    rng = np.random.default_rng(seed)
    n = round(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    out = np.zeros(n)
    # chords: one per second, random root, major triad
    for start in range(0, n, sample_rate):
        stop = min(n, start + sample_rate)
        root = 110.0 * 2 ** rng.uniform(0, 2)
        seg = t[start:stop]
        for ratio in (1.0, 1.26, 1.5):
            for harmonic in (1, 2, 3):
                out[start:stop] += np.sin(2 * np.pi * root * ratio * harmonic * seg) / (
                    3 * harmonic
                )
    # beats: decaying noise bursts at 120 bpm
    beat = sample_rate // 2
    burst = rng.standard_normal(beat) * np.exp(-np.arange(beat) / (0.03 * sample_rate))
    for start in range(0, n, beat):
        stop = min(n, start + beat)
        out[start:stop] += 0.5 * burst[: stop - start]
    # a chirp sweeping 200 Hz → 4 kHz over the whole clip, and a noise floor
    sweep = 200.0 * (20.0 ** (t / max(seconds, 1e-9)))
    out += 0.2 * np.sin(2 * np.pi * np.cumsum(sweep) / sample_rate)
    out += 0.01 * rng.standard_normal(n)
    out *= level / max(1e-9, np.max(np.abs(out)))
    return out.astype(np.float32)
