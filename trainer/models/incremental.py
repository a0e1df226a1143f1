"""Incremental streaming inference for the FCNs: compute only what each hop adds, exactly.

Consecutive windows of a stream overlap: at FCN-4's 3.413 s hop they share 88 % of their
audio. Every layer of an FCN is local in time (centred STFT frames, the per-band input
BatchNorm, 3 × 3 convolutions, BatchNorm, ReLU, floor-mode max pools), so a column of a
layer's output map that depends on stream audio alone, and not on the zeros that
'same' padding and centred framing put at the window's two edges, is the same column
one hop later, shifted left by the hop divided by the layer's cumulative time stride.

The *levels* here are the maps of one window: level 0 the log-mel frames after the
input BatchNorm (one column per STFT frame), level i the output of conv block i (after
its pool). For a hop of ``h`` frames, level ``i`` shifts by ``h / stride_i`` columns,
a whole number when ``stride_i`` divides ``h``: those levels are *reusable*. Of a
reusable level, the columns ``[first, last]`` that depend on stream audio only are its
*global* columns.

An ``IncrementalPlan`` says, for one model and hop, what a window costs given the last
one's state:

- *stored* levels keep their global columns from one window to the next (the state a
  stream carries); the deepest reusable level is always stored, lower ones only when
  keeping them saves at least ``MIN_MACS_PER_STATE_BYTE`` (FCN-4's block 1 map is 8 MB
  a stream and costs 2 M MACs to recompute where it is needed: not kept);
- per level, the column intervals computed afresh each hop: the new global columns of
  a stored level, the edge columns the padding touches, and what those need below;
  everything else comes from the state. Blocks above the deepest stored level run on
  its whole map, as in the full network;
- *partial* stored levels keep, beside their columns, part of a pool: a stored level's
  left edge column pools ``P`` convolution positions of which only the first few see the
  padding; the others are the positions of the column that lands there, one hop
  earlier. Their max (the column's *tail*) is kept from when that column was new, so the
  edge column convolves those few positions only (FCN-4: 2 of block 3's 8, 2 of block
  2's 5), and every level below needs fewer columns. Kept where it saves
  ``MIN_MACS_PER_STATE_BYTE`` too (FCN-4: 13 % of a step's MACs for 0.23 MB);
- the block above the top pools its whole map, but its convolution positions (one per
  column of the top level) shift by whole positions: those that read stream audio alone
  are kept, pooled in frequency (*kept_above*), and a hop convolves only the edge and new
  ones (FCN-4's block 4: 4 of 8, another 11 % of a step's MACs for 40 kB).

A level's intervals go through one convolution where its weights outweigh its outputs,
one each where the outputs do (``_convolve``): what ONNX Runtime runs fastest.

``FCNPrime`` (a whole window → scores and state) and ``FCNStep`` (a window and the last
window's state → scores and the next state) are the two graphs `tagd-train export`
writes beside the model (``FCN.incremental_graphs`` gives them with the plan's figures);
their scores equal the full network's to float rounding (tests/test_incremental.py
checks ≤ 1e-4 over many hops for every preset). Exported with an aggregator, both also
give the window's embedding (``FCN.embed``, the head's input, which they compute anyway)
as their last output, so a song's aggregator steps without a second CNN.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from trainer.models.base import IncrementalGraphs, scaled

if TYPE_CHECKING:  # fcn.py imports this module: its FCN declares the graphs below
    from trainer.models.fcn import FCN, FCNConfig

# A level below the deepest stored one is kept in the state only when storing it saves
# this many multiply-accumulates per hop for each byte it adds to a stream's state.
MIN_MACS_PER_STATE_BYTE = 64
STATE_BYTES_PER_VALUE = 4  # float32

Interval = tuple[int, int]  # half-open [lo, hi) of columns


@dataclass(frozen=True)
class Level:
    """One map of a window: its time width, stride and the columns free of edge effects."""

    index: int  # 0: log-mel frames; i ≥ 1: output of conv block i
    name: str  # "logmel", "block1", …: names the state tensor
    columns: int  # time width of the map
    stride: int  # cumulative time stride, in STFT frames
    channels: int
    bands: int  # frequency rows
    first_global: int  # columns [first_global, last_global] depend on stream audio only
    last_global: int  # (last < first: none)
    macs_per_column: int  # to compute one column from the level below

    @property
    def global_columns(self) -> int:
        return max(0, self.last_global - self.first_global + 1)

    @property
    def state_values(self) -> int:
        return self.channels * self.bands * self.global_columns


def fcn_levels(config: FCNConfig, widths: list[int]) -> list[Level]:
    """The levels of an FCN window, from the geometry of its config and channel widths."""
    c = config
    n_bins = c.n_fft // 2 + 1
    half = c.n_fft // 2
    # frame j covers samples [j * hop - n_fft/2, j * hop + n_fft/2) of the window
    first = math.ceil(half / c.hop_length)
    last = (c.window_samples - half) // c.hop_length
    frontend_macs = 2 * n_bins * c.n_fft + c.n_mels * n_bins  # DFT, then mel matmul
    levels = [Level(0, "logmel", c.n_frames, 1, 1, c.n_mels, first, last, frontend_macs)]
    for i, ((pool_f, pool_t), out_channels) in enumerate(zip(c.pools, widths, strict=True)):
        below = levels[-1]
        # conv column j (3 wide) is global when columns j-1..j+1 below are; a pooled
        # column q when conv columns q*pt .. q*pt+pt-1 are
        first = math.ceil((below.first_global + 1) / pool_t)
        last = below.last_global // pool_t - 1
        macs = pool_t * below.bands * below.channels * out_channels * 9
        levels.append(
            Level(
                i + 1,
                f"block{i + 1}",
                below.columns // pool_t,
                below.stride * pool_t,
                out_channels,
                below.bands // pool_f,
                first,
                last,
                macs,
            )
        )
    return levels


def reusable_levels(levels: list[Level], hop_frames: int) -> list[Level]:
    """Levels whose shift at this hop is a whole number of columns, with a column to reuse."""
    found = []
    for level in levels:
        if hop_frames % level.stride:
            break  # strides are cumulative products: no deeper level divides either
        if level.global_columns > hop_frames // level.stride:
            found.append(level)
    return found


def _merge(intervals: list[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for lo, hi in sorted(i for i in intervals if i[1] > i[0]):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _subtract(intervals: list[Interval], hole: Interval) -> list[Interval]:
    out = []
    for lo, hi in intervals:
        out += [(lo, min(hi, hole[0])), (max(lo, hole[1]), hi)]
    return _merge(out)


@dataclass
class IncrementalPlan:
    """What one hop computes for one FCN at one hop; see the module docstring."""

    hop_samples: int
    hop_frames: int
    levels: list[Level]
    top: int  # deepest stored level: the blocks above it run on its whole map
    stored: tuple[int, ...]
    compute: dict[int, list[Interval]] = field(default_factory=dict)  # per level ≤ top
    above_macs: int = 0  # blocks above the top, the 1 × 1 convs and the head
    # partial levels: their edge column convolves positions [0, edge_positions) afresh
    # and takes the rest of its pool from the tail kept with the state
    edge_positions: dict[int, int] = field(default_factory=dict)
    # the block above the top: its convolution positions [lo, hi) (one per column of the
    # top level), pooled in frequency, kept with the state; None: its whole map every hop
    kept_above: Interval | None = None

    def shift(self, level: int) -> int:
        return self.hop_frames // self.levels[level].stride

    def reused_from_state(self, level: int) -> Interval:
        """Columns of a stored level taken from the last window's state."""
        lv = self.levels[level]
        return (lv.first_global, lv.last_global - self.shift(level) + 1)

    def new_global(self, level: int) -> Interval:
        """Global columns of a stored level that the last window did not have."""
        lv = self.levels[level]
        return (lv.last_global - self.shift(level) + 1, lv.last_global + 1)

    @property
    def partial(self) -> tuple[int, ...]:
        return tuple(sorted(self.edge_positions))

    def landing_columns(self, level: int) -> range:
        """Columns of a partial level that reach its edge column by whole hops (their
        tails are kept): the shift, twice the shift, …; the last is new every hop."""
        shift = self.shift(level)
        return range(shift, self.levels[level].last_global + 1, shift)

    def above_fresh(self) -> list[Interval]:
        """Positions of the block above the top convolved each hop (with ``kept_above``):
        those the edges reach and those the hop adds; the rest come from the state."""
        lo, hi = self.kept_above
        return [(0, lo), (hi - self.shift(self.top), self.above_used)]

    @property
    def above_used(self) -> int:
        """Positions of the block above the top that its time pool reads (floor mode)."""
        above = self.levels[self.top + 1]
        return above.columns * (above.stride // self.levels[self.top].stride)

    @property
    def state_levels(self) -> list[tuple[str, int, tuple[int, int, int]]]:
        """(name, level, shape) of each state tensor: stored levels, then tails, then the
        kept positions of the block above the top."""
        found = [(self.levels[i].name, i, self.level_shape(i)) for i in self.stored]
        for i in self.partial:
            lv = self.levels[i]
            shape = (lv.channels, lv.bands, len(self.landing_columns(i)))
            found.append((f"{lv.name}_tail", i, shape))
        if self.kept_above is not None:
            above = self.levels[self.top + 1]
            lo, hi = self.kept_above
            shape = (above.channels, above.bands, hi - lo)
            found.append((f"{above.name}_positions", above.index, shape))
        return found

    @property
    def state_bytes(self) -> int:
        return STATE_BYTES_PER_VALUE * sum(math.prod(shape) for *_, shape in self.state_levels)

    def level_shape(self, level: int) -> tuple[int, int, int]:
        lv = self.levels[level]
        return (lv.channels, lv.bands, lv.global_columns)

    @property
    def step_macs(self) -> int:
        computed = 0
        for i, spans in self.compute.items():
            lv = self.levels[i]
            columns = sum(hi - lo for lo, hi in spans)
            computed += lv.macs_per_column * columns
            if i in self.edge_positions:  # the edge column convolves a few positions
                pool_t = lv.stride // self.levels[i - 1].stride
                computed -= lv.macs_per_column * (pool_t - self.edge_positions[i]) // pool_t
        above = self.above_macs
        if self.kept_above is not None:  # the block above the top: fresh positions only
            lv = self.levels[self.top + 1]
            pool_t = lv.stride // self.levels[self.top].stride
            fresh = sum(hi - lo for lo, hi in self.above_fresh())
            above -= lv.macs_per_column * (self.above_used - fresh) // pool_t
        return computed + above

    @property
    def full_macs(self) -> int:
        window = sum(lv.macs_per_column * lv.columns for lv in self.levels[: self.top + 1])
        return window + self.above_macs

    def picture(self, width: int = 64) -> list[str]:
        """Each level's columns scaled to ``width`` characters: ``#`` computed this hop,
        ``=`` taken from the state, ``·`` not needed; blocks above the top all ``#``."""
        lines = []
        for lv in self.levels:
            cells = min(width, lv.columns)
            scale = lv.columns / cells
            row = []
            for cell in range(cells):
                lo, hi = int(cell * scale), max(int(cell * scale) + 1, int((cell + 1) * scale))
                if lv.index > self.top or any(a < hi and lo < b for a, b in self.compute[lv.index]):
                    row.append("#")
                elif lv.index in self.stored:
                    row.append("=")
                else:
                    row.append("·")
            lines.append(f"{lv.name:>7} {''.join(row)}")
        return lines

    def describe(self) -> list[str]:
        """One line per level: width, stride, shift, stored or not, columns computed."""
        lines = []
        for lv in self.levels[: self.top + 1]:
            spans = self.compute[lv.index]
            computed = sum(hi - lo for lo, hi in spans)
            kept = "state" if lv.index in self.stored else "recomputed where needed"
            if lv.index in self.edge_positions:
                kept += f" (edge column: {self.edge_positions[lv.index]} positions + kept tail)"
            where = ", ".join(f"{lo}" if hi == lo + 1 else f"{lo}–{hi - 1}" for lo, hi in spans)
            lines.append(
                f"{lv.name}: {lv.columns} columns, stride {lv.stride} frames, shift "
                f"{self.shift(lv.index)}; {kept}; computes {computed} ({where})"
            )
        for lv in self.levels[self.top + 1 :]:
            if lv.index == self.top + 1 and self.kept_above is not None:
                lo, hi = self.kept_above
                fresh = ", ".join(f"{a}–{b - 1}" for a, b in self.above_fresh())
                lines.append(
                    f"{lv.name}: {lv.columns} columns from {self.above_used} positions; "
                    f"positions {lo}–{hi - 1} in the state (pooled in frequency); "
                    f"convolves {fresh}"
                )
            else:
                lines.append(f"{lv.name}: {lv.columns} columns, whole map every hop")
        return lines


def plan_incremental(
    config: FCNConfig,
    widths: list[int],
    hop_samples: int,
    stored: tuple[int, ...] | None = None,
    partial: tuple[int, ...] | None = None,
    keep_above: bool | None = None,
) -> IncrementalPlan | None:
    """The plan for ``hop_samples``; None when no level can be reused at that hop.

    ``stored``, ``partial`` and ``keep_above`` force the stored and partial levels and
    the kept positions above the top (tests); by default the deepest reusable level and
    those below it that earn their bytes (``MIN_MACS_PER_STATE_BYTE``), of those the
    partial ones that earn theirs, and the positions above when they earn theirs.
    """
    if hop_samples <= 0 or hop_samples % config.hop_length:
        return None
    hop_frames = hop_samples // config.hop_length
    levels = fcn_levels(config, widths)
    reusable = reusable_levels(levels, hop_frames)
    if not reusable:
        return None
    top = reusable[-1].index
    above = sum(lv.macs_per_column * lv.columns for lv in levels[top + 1 :])
    above += _head_macs(config, widths)
    args = (config, levels, hop_samples, hop_frames, top)
    if stored is not None:
        if top not in stored or any(i not in {lv.index for lv in reusable} for i in stored):
            raise ValueError(f"stored levels {stored} must be reusable and include {top}")
        stored_set = set(stored)
    else:
        stored_set = {lv.index for lv in reusable}
        best = _planned(*args, stored_set, set(), above)
        for lv in reusable[:-1]:
            trial = _planned(*args, stored_set - {lv.index}, set(), above)
            saved_bytes = STATE_BYTES_PER_VALUE * lv.state_values
            if trial.step_macs - best.step_macs < MIN_MACS_PER_STATE_BYTE * saved_bytes:
                stored_set.discard(lv.index)
                best = trial
    can = {i for i in stored_set if _edge_positions(config, levels, i) is not None}
    if partial is not None:
        if not set(partial) <= can:
            raise ValueError(f"partial levels {partial} must be among {sorted(can)}")
        return _with_kept_above(_planned(*args, stored_set, set(partial), above), keep_above)
    chosen: set[int] = set()
    best = _planned(*args, stored_set, chosen, above)
    for index in sorted(can):
        trial = _planned(*args, stored_set, chosen | {index}, above)
        if best.step_macs - trial.step_macs >= MIN_MACS_PER_STATE_BYTE * (
            trial.state_bytes - best.state_bytes
        ):
            chosen.add(index)
            best = trial
    return _with_kept_above(best, keep_above)


def _with_kept_above(plan: IncrementalPlan, keep: bool | None) -> IncrementalPlan:
    """The plan keeping the positions of the block above its top that a hop can reuse,
    where there is such a block and that earns its bytes (or ``keep`` says so)."""
    if keep is False or plan.top + 1 >= len(plan.levels):
        return plan
    top = plan.levels[plan.top]
    # position p reads the top's columns p-1 … p+1: from stream audio alone when those are
    lo, hi = top.first_global + 1, top.last_global
    trial = dataclasses.replace(plan, kept_above=(lo, hi))
    if hi > trial.above_used or hi - plan.shift(plan.top) <= lo:
        if keep:
            raise ValueError("the block above the top has no positions to keep at this hop")
        return plan
    earns = plan.step_macs - trial.step_macs >= MIN_MACS_PER_STATE_BYTE * (
        trial.state_bytes - plan.state_bytes
    )
    return trial if keep or earns else plan


def _edge_positions(config: FCNConfig, levels: list[Level], index: int) -> int | None:
    """Of level ``index``'s edge column, the convolution positions that see the
    padding (those that must be computed afresh); None where the rest of its pool
    cannot be kept (the level's edge is not exactly one column, or nothing is left)."""
    if index < 1 or levels[index].first_global != 1:
        return None
    fresh = levels[index - 1].first_global + 1  # position p reads columns p-1 … p+1 below
    return fresh if fresh < config.pools[index - 1][1] else None


def _head_macs(config: FCNConfig, widths: list[int]) -> int:
    extra = [scaled(ch, config.width) for ch in config.extra_1x1]
    dims = [widths[-1], *extra]
    return sum(a * b for a, b in zip(dims, dims[1:], strict=False)) + dims[-1] * config.n_tags


def _planned(
    config, levels, hop_samples, hop_frames, top, stored, partial, above
) -> IncrementalPlan:
    plan = IncrementalPlan(
        hop_samples, hop_frames, levels, top, tuple(sorted(stored)), above_macs=above
    )
    plan.edge_positions = {i: _edge_positions(config, levels, i) for i in sorted(partial)}
    need = [(0, levels[top].columns)]
    for index in range(top, -1, -1):
        if index in stored:
            spans = _merge(
                _subtract(need, plan.reused_from_state(index)) + [plan.new_global(index)]
            )
        else:
            spans = _merge(need)
        plan.compute[index] = spans
        if index > 0:
            pool_t = config.pools[index - 1][1]
            below = levels[index - 1].columns
            wanted = []
            for lo, hi in spans:
                if lo == 0 and index in partial:  # the edge column's fresh positions
                    wanted.append((0, plan.edge_positions[index] + 1))
                    lo = 1
                if hi > lo:
                    wanted.append((max(pool_t * lo - 1, 0), min(pool_t * hi + 1, below)))
            need = _merge(wanted)
    return plan


# -- the two graphs --------------------------------------------------------------------------
class _Incremental(nn.Module):
    """What FCNPrime and FCNStep share: the model's layers and the plan."""

    def __init__(self, model: FCN, plan: IncrementalPlan, embedding: bool = False):
        super().__init__()
        self.model = model
        self.plan = plan
        self.embedding = embedding  # the embedding as the last output too
        self.state_names = [name for name, *_ in plan.state_levels]

    def _outputs(self, top_map: torch.Tensor, states: list[torch.Tensor], kept=None) -> tuple:
        """(scores, *states[, embedding]) from the deepest stored level's whole map, the
        scores as FCN.forward ends. With the plan's ``kept_above``, the block above the
        top takes its kept positions (``kept``: the last window's, None when priming)
        and hands this window's on as the last state tensor."""
        x = top_map  # (B, C, H, W)
        blocks = self.model.blocks[self.plan.top :]
        if self.plan.kept_above is not None:
            x, positions = self._above(x, kept)
            states = [*states, positions]
            blocks = blocks[1:]
        for block in blocks:
            x = block(x)
        for layer in self.model.extra:
            x = layer(x)
        embedding = torch.amax(x, dim=(2, 3))  # (B, C): FCN.embed
        scores = torch.sigmoid(self.model.head(embedding))  # (B, n_tags)
        return (scores, *states, embedding) if self.embedding else (scores, *states)

    def _above(self, top_map: torch.Tensor, kept) -> tuple[torch.Tensor, torch.Tensor]:
        """The block above the top: its output map, and its positions to keep. Its pool is
        taken in frequency first, then in time (the same max); a position reads the top's
        columns p-1 … p+1, so those of stream audio alone come from the last window's."""
        plan = self.plan
        block = self.model.blocks[plan.top]
        pool_f, pool_t = self.model.config.pools[plan.top]
        lo, hi = plan.kept_above

        def columns(a: int, b: int) -> torch.Tensor:
            return top_map[..., a:b]

        intervals = [(0, plan.above_used)] if kept is None else plan.above_fresh()
        fresh = [
            nn.functional.max_pool2d(x, (pool_f, 1))  # pooled in frequency
            for x in _convolve(block, columns, plan.levels[plan.top], intervals)
        ]
        if kept is None:
            pooled = fresh[0]
        else:
            reused = kept[..., plan.shift(plan.top) :]  # the last window's, one hop on
            pooled = torch.cat((fresh[0], reused, fresh[1]), dim=-1)
        return nn.functional.max_pool2d(pooled, (1, pool_t)), pooled[..., lo:hi]

    def _tails(self, index: int, activations: torch.Tensor) -> torch.Tensor:
        """Each pooled column's max over its positions from the edge column's fresh ones
        on (the part of its pool that holds one hop later), from a block's activations
        before its pool, columns of the whole pool windows they hold."""
        pool_f, pool_t = self.model.config.pools[index - 1]
        fresh = self.plan.edge_positions[index]
        return nn.functional.max_pool2d(
            activations[..., fresh:], (pool_f, pool_t - fresh), (pool_f, pool_t)
        )  # (B, C, H // pool_f, pooled columns)


class FCNPrime(_Incremental):
    """A whole window → (scores, state): how a stream starts, or restarts after a gap."""

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m, plan = self.model, self.plan
        x = m.input_bn(m.frontend(wave)).unsqueeze(1)  # (B, 1, M, N)
        maps, tails = [x], {}
        for index, block in enumerate(m.blocks[: plan.top], start=1):
            if index in plan.edge_positions:
                activations = block.activations(x)
                x = block.pool(activations)
                landing = plan.landing_columns(index)
                tails[index] = self._tails(index, activations)[
                    ..., landing.start : landing.stop : landing.step
                ]
            else:
                x = block(x)  # (B, C_i, H_i, W_i)
            maps.append(x)
        states = []
        for index in plan.stored:
            lv = plan.levels[index]
            states.append(maps[index][..., lv.first_global : lv.last_global + 1])
        states += [tails[index] for index in plan.partial]
        return self._outputs(maps[plan.top], states)


class FCNStep(_Incremental):
    """(window, last window's state) → (scores, state): one hop, computing only what it adds."""

    def forward(self, wave: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        plan = self.plan
        kept = states[-1] if plan.kept_above is not None else None
        states = states[:-1] if kept is not None else states
        previous = dict(zip(plan.stored, states, strict=False))
        previous_tails = dict(zip(plan.partial, states[len(plan.stored) :], strict=True))
        # per level: (lo, hi, tensor) pieces of this window's map
        pieces: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
        next_states, next_tails = [], []
        for index in range(plan.top + 1):
            pieces[index] = []
            if index == 0:
                for lo, hi in plan.compute[0]:
                    pieces[0].append((lo, hi, self._frames(lo, hi, wave)))
            else:
                next_tails += self._block(index, pieces, previous_tails.get(index))
            if index in previous:
                lv = plan.levels[index]
                new_lo, new_hi = plan.new_global(index)
                new = self._columns(pieces[index], new_lo, new_hi)
                state = torch.cat((previous[index][..., plan.shift(index) :], new), dim=-1)
                next_states.append(state)  # (B, C, H, global columns)
                pieces[index].append((lv.first_global, lv.last_global + 1, state))
        top = self._columns(pieces[plan.top], 0, plan.levels[plan.top].columns)
        return self._outputs(top, next_states + next_tails, kept)

    def _block(self, index: int, pieces, previous_tail: torch.Tensor | None) -> list:
        """Level ``index``'s columns this hop into ``pieces``; of a partial level
        (``previous_tail`` given) also its next tails, as a list of one."""
        plan = self.plan
        block = self.model.blocks[index - 1]
        pool_f, pool_t = self.model.config.pools[index - 1]
        # a partial level's newest landing column is new this hop: its tail is made from
        # its own positions (a span of its own)
        newest = plan.landing_columns(index)[-1] if previous_tail is not None else None
        intervals, spans = [], []
        for lo, hi in plan.compute[index]:
            if lo == 0 and newest is not None:  # the edge: its fresh positions
                intervals.append((0, plan.edge_positions[index]))
                spans.append((0, 0))
                lo = 1
            cuts = (
                [lo, hi]
                if newest is None or not lo <= newest < hi
                else [lo, newest, newest + 1, hi]
            )
            for a, b in zip(cuts, cuts[1:], strict=False):
                if b > a:
                    intervals.append((pool_t * a, pool_t * b))
                    spans.append((a, b))

        def below(a: int, b: int) -> torch.Tensor:
            return self._columns(pieces[index - 1], a, b)

        activations = _convolve(block, below, plan.levels[index - 1], intervals)
        tails = []
        for (lo, hi), x in zip(spans, activations, strict=True):
            if hi == lo:  # the edge column, with the tail kept one hop earlier
                fresh = nn.functional.max_pool2d(x, (pool_f, plan.edge_positions[index]))
                pieces[index].append((0, 1, torch.maximum(fresh, previous_tail[..., :1])))
                continue
            pieces[index].append((lo, hi, block.pool(x)))  # (B, C, H // pool_f, hi - lo)
            if lo == newest:
                older = previous_tail[..., 1:]  # the first one went into the edge
                tails.append(torch.cat((older, self._tails(index, x)), dim=-1))
        return tails

    def _frames(self, lo: int, hi: int, wave: torch.Tensor) -> torch.Tensor:
        """Log-mel frames [lo, hi) of the window, from its samples."""
        m, c = self.model, self.model.config
        half = c.n_fft // 2
        start, end = lo * c.hop_length - half, (hi - 1) * c.hop_length + half
        size = m.window_samples  # a constant, not the traced input's shape
        x = wave[:, max(start, 0) : min(end, size)]  # (B, samples)
        zeros = (max(0, -start), max(0, end - size))  # centred frames past the edges
        x = nn.functional.pad(x, zeros) if any(zeros) else x
        return m.input_bn(m.frontend(x, centred=False)).unsqueeze(1)  # (B, 1, M, hi - lo)

    @staticmethod
    def _columns(pieces, lo: int, hi: int) -> torch.Tensor:
        """Columns [lo, hi) of a level, cut from the pieces that hold them."""
        parts = []
        at = lo
        while at < hi:
            piece = next((p for p in pieces if p[0] <= at < p[1]), None)
            if piece is None:
                raise AssertionError(f"column {at} of a level was neither computed nor kept")
            p_lo, p_hi, tensor = piece
            end = min(hi, p_hi)
            parts.append(tensor[..., at - p_lo : end - p_lo])
            at = end
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _convolve(block, columns, below: Level, intervals: list[Interval]) -> list[torch.Tensor]:
    """A conv block's positions for each interval [a, b), after BN and ReLU, before its
    pool, from the level ``below`` (``columns(lo, hi)`` gives its columns).

    Where the block's weights outweigh its outputs (deep blocks, few positions: FCN-4's
    blocks 3 and 4, 11 and 57 MB float32), one convolution for all: a call reads all its
    weights, which costs as much as several positions; each interval's input (its columns
    and one either side, the window's zeros past its edges) is laid side by side, and the
    outputs that straddle two are dropped. Elsewhere one convolution an interval: cutting
    a big output apart makes ONNX Runtime copy it out of its blocked layout, which costs
    more than a second call."""
    positions = sum(b - a for a, b in intervals)
    if len(intervals) > 1 and block.conv.in_channels * 9 < below.bands * positions:
        return [_convolve(block, columns, below, [interval])[0] for interval in intervals]
    parts, offsets, at = [], [], 0
    for a, b in intervals:
        start, end = a - 1, b + 1  # the 3-wide conv's context
        x = columns(max(start, 0), min(end, below.columns))
        zeros = (max(0, -start), max(0, end - below.columns))  # the window's, past its edges
        parts.append(nn.functional.pad(x, zeros) if any(zeros) else x)
        offsets.append(at)
        at += b - a + 2
    x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    # 'same' padding in frequency is the convolution's own: no node of its own
    x = block.activate(nn.functional.conv2d(x, block.conv.weight, padding=(1, 0)))
    if len(intervals) == 1:
        return [x]  # no cut: a slice would make ONNX Runtime copy the map out of its layout
    return [x[..., o : o + b - a] for o, (a, b) in zip(offsets, intervals, strict=True)]


def incremental_graphs(
    model: FCN, hop_samples: int, embedding: bool = False
) -> IncrementalGraphs | None:
    """The prime and step modules of ``model`` at ``hop_samples`` with what the card says
    of them (with ``embedding``, the window's embedding as their last output); None when
    nothing reuses."""
    plan = model_plan(model, hop_samples)
    if plan is None:
        return None
    # in inference mode whatever the model's: BatchNorm must use its running statistics
    prime = FCNPrime(model, plan, embedding).eval()
    step = FCNStep(model, plan, embedding).eval()
    return IncrementalGraphs(
        prime=prime,
        step=step,
        state_names=tuple(prime.state_names),
        state_shapes=tuple(shape for *_, shape in plan.state_levels),
        time_strides=tuple(lv.stride * model.config.hop_length for lv in plan.levels),
        reused_levels=plan.top + 1,
        state_bytes=plan.state_bytes,
        step_macs=plan.step_macs,
        full_macs=plan.full_macs,
    )


def model_plan(model: FCN, hop_samples: int) -> IncrementalPlan | None:
    widths = [block.conv.out_channels for block in model.blocks]
    return plan_incremental(model.config, widths, hop_samples)
