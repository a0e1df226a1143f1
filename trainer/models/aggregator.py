"""Song-level tags from many windows: an aggregator over a sequence of window embeddings.

Sankaran (2017, the thesis's chapter on songs of any length) cuts a song into 29.1 s
windows, lets the CNN turn each into the features of its last hidden layer, and combines
the sequence with a two-layer LSTM: the first layer sequence-to-sequence, the second
sequence-to-one, dropout 0.3, hidden size 1,024 in its best setting. Its baseline is a
bag of frames: the same features averaged over the song. Both are here, over
``TaggerModel.embed``:

  lstm  LayerNorm → 2-layer LSTM (dropout between layers) → last step → dropout → dense
  mean  LayerNorm → running mean over the windows so far → dropout → dense

Both read the windows in order and keep an explicit, fixed-size state per song (h and c
of each LSTM layer; the running sum and count of the mean), so one ``step`` per window
from ``initial_state`` gives exactly what ``forward_logits`` gives on the whole sequence:
the song-so-far prediction, offline or on a live stream.

The default hidden size is ``DEFAULT_HIDDEN`` (256), not the thesis's ``THESIS_HIDDEN``
(1,024): a few hundred songs train on two CPU cores in minutes at 256, and that is the
size docs/training.md measured. ``--hidden 1024`` gives the thesis's setting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

AGGREGATOR_KINDS = ("lstm", "mean")
THESIS_HIDDEN = 1024  # Sankaran 2017's best LSTM
DEFAULT_HIDDEN = 256  # trains on a 2-core CPU; see the module docstring
THESIS_LAYERS = 2
THESIS_DROPOUT = 0.3


@dataclass
class AggregatorConfig:
    embedding_size: int  # features per window: the CNN's ``embedding_size``
    n_tags: int
    kind: str = "lstm"  # one of AGGREGATOR_KINDS
    hidden: int = DEFAULT_HIDDEN  # LSTM units per layer (lstm only)
    layers: int = THESIS_LAYERS  # LSTM layers (lstm only)
    dropout: float = THESIS_DROPOUT  # between LSTM layers and before the output layer

    def __post_init__(self) -> None:
        if self.kind not in AGGREGATOR_KINDS:
            raise ValueError(
                f"aggregator kind must be one of {', '.join(AGGREGATOR_KINDS)}, got {self.kind!r}"
            )
        for name in ("embedding_size", "n_tags", "hidden", "layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"aggregator {name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"aggregator dropout must be in [0, 1), got {self.dropout}")


class Aggregator(nn.Module):
    """Base: sequences of embeddings in, logits out; ``step`` advances one window."""

    config: AggregatorConfig
    state_names: tuple[str, ...]

    def __init__(self, config: AggregatorConfig):
        super().__init__()
        self.config = config
        self.n_tags = config.n_tags
        self.norm = nn.LayerNorm(config.embedding_size)

    @property
    def hparams(self) -> dict:
        return dataclasses.asdict(self.config)

    def state_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Each state tensor's shape for one song, the batch axis left out."""
        raise NotImplementedError

    def initial_state(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        """The state before a song's first window: zeros."""
        return tuple(torch.zeros((batch, *shape)) for shape in self.state_shapes())

    def step(self, embedding: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One window: (B, D) and the state → (logits (B, n_tags), *next state)."""
        raise NotImplementedError

    def forward_logits(self, embeddings: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, D) padded after each song's ``lengths`` windows → logits after its last."""
        raise NotImplementedError

    def forward(self, embeddings: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward_logits(embeddings, lengths))  # (B, n_tags)


def lstm_cell(
    lstm: nn.LSTM, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of a single-layer ``nn.LSTM`` from its own weights: x (B, D), h and c
    (B, H) → the next h and c. PyTorch's gate order: input, forget, cell, output."""
    gates = (
        x @ lstm.weight_ih_l0.T + lstm.bias_ih_l0 + h @ lstm.weight_hh_l0.T + lstm.bias_hh_l0
    )  # (B, 4H)
    i, f, g, o = gates.chunk(4, dim=1)  # (B, H) each
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class LSTMAggregator(Aggregator):
    """The thesis's two-layer LSTM, sequence-to-sequence then sequence-to-one.

    One single-layer ``nn.LSTM`` per layer, dropout between them. ``step`` computes the
    LSTM cell from the same weights in plain matrix products (``lstm_cell``), so the
    exported step graph is MatMul, Sigmoid and Tanh, which any ONNX runtime runs alike.
    """

    def __init__(self, config: AggregatorConfig):
        super().__init__(config)
        c = config
        self.state_names = tuple(
            f"{part}{layer}" for part in ("h", "c") for layer in range(c.layers)
        )
        self.lstms = nn.ModuleList(
            nn.LSTM(c.embedding_size if layer == 0 else c.hidden, c.hidden, batch_first=True)
            for layer in range(c.layers)
        )
        self.drop = nn.Dropout(c.dropout)  # between layers and before the output layer
        self.head = nn.Linear(c.hidden, c.n_tags)

    def state_shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple((self.config.hidden,) for _ in self.state_names)

    def step(self, embedding: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layers = self.config.layers
        hs, cs = [], []
        x = self.norm(embedding)  # (B, D)
        for layer, lstm in enumerate(self.lstms):
            if layer:
                x = self.drop(x)
            x, c = lstm_cell(lstm, x, state[layer], state[layers + layer])  # (B, H) each
            hs.append(x)
            cs.append(c)
        logits = self.head(self.drop(x))  # (B, n_tags)
        return (logits, *hs, *cs)

    def forward_logits(self, embeddings: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # The LSTM is causal: the padding after a song's last window cannot reach the
        # output at that window, so the whole padded batch runs at once.
        x = self.norm(embeddings)  # (B, T, D)
        for layer, lstm in enumerate(self.lstms):
            if layer:
                x = self.drop(x)
            x, _ = lstm(x)  # (B, T, H)
        last = (lengths.long() - 1).clamp(min=0).to(x.device)  # (B,)
        x = x[torch.arange(x.shape[0], device=x.device), last]  # (B, H)
        return self.head(self.drop(x))  # (B, n_tags)


class MeanAggregator(Aggregator):
    """The bag of frames: the mean of the (normalised) embeddings so far, then a dense layer."""

    state_names = ("sum", "count")

    def __init__(self, config: AggregatorConfig):
        super().__init__(config)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.embedding_size, config.n_tags)

    def state_shapes(self) -> tuple[tuple[int, ...], ...]:
        return ((self.config.embedding_size,), (1,))

    def step(self, embedding: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        total, count = state
        total = total + self.norm(embedding)  # (B, D)
        count = count + 1.0  # (B, 1)
        return (self.head(self.drop(total / count)), total, count)

    def forward_logits(self, embeddings: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(embeddings.shape[1], device=embeddings.device)  # (T,)
        mask = (steps[None, :] < lengths.to(embeddings.device)[:, None]).unsqueeze(2)  # (B, T, 1)
        total = (self.norm(embeddings) * mask).sum(dim=1)  # (B, D)
        mean = total / mask.sum(dim=1).clamp(min=1)  # (B, D)
        return self.head(self.drop(mean))  # (B, n_tags)


_KINDS: dict[str, type[Aggregator]] = {"lstm": LSTMAggregator, "mean": MeanAggregator}


def create_aggregator(config: AggregatorConfig) -> Aggregator:
    """The aggregator ``config.kind`` names (validated by the config)."""
    return _KINDS[config.kind](config)
