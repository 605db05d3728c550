"""What the channel dependency graph (:mod:`.graph`) is made of: channel spaces laid out along a
tensor's dimension (:class:`Segment`, :class:`Layout`), groups of coupled channels and the
layers they live in (:class:`Group`), and the graph with the recorded run's statistics
(:class:`DependencyGraph`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Segment:
    """``count`` channels of ``space``, each repeated ``repeat`` times along the dimension."""

    space: int
    count: int
    repeat: int = 1


@dataclass
class Layout:
    """A tensor's channel dimension ``dim`` (negative: from the end) as segments."""

    dim: int
    segments: list[Segment]

    @property
    def width(self) -> int:
        return sum(s.count * s.repeat for s in self.segments)


@dataclass
class Use:
    """A module reading a layout along its input dimension (a Conv2d's channels, a Linear's features)."""

    module: str
    segments: list[Segment]


@dataclass
class Group:
    """Coupled channels: ``size`` channels removed together from every member.

    ``producers``: Conv2d/Linear whose output rows are these channels (depthwise
    convolutions included: their rows and groups shrink with the channels); ``norms``:
    BatchNorms (and GroupNorms with one group per channel) over them, each channel
    normalised by itself; ``consumers``: modules whose input columns read them, with
    ``(offset, repeat)`` of each appearance in that module's input dimension;
    ``embeddings``: ``nn.Embedding`` modules whose weight columns are these channels;
    ``layer_norms``: LayerNorms/RMSNorms whose statistics span all these channels.
    """

    root: int
    size: int
    producers: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    consumers: list[tuple[str, int, int]] = field(default_factory=list)
    frozen: str | None = None  #: why these channels cannot be removed (``None``: they can)
    norm_after: dict[str, str] = field(default_factory=dict)  #: producer -> the BatchNorm reading its output
    embeddings: list[str] = field(default_factory=list)
    layer_norms: list[str] = field(default_factory=list)

    @property
    def hidden(self) -> bool:
        """Whether these channels come from an Embedding or reach a LayerNorm/RMSNorm: a transformer's
        hidden size (its residual stream); ``sn.shrink`` removes them only with ``hidden=``."""
        return bool(self.embeddings or self.layer_norms)

    @property
    def label(self) -> str:
        """The group's name: its first producer (or embedding)."""
        return (self.producers + self.embeddings)[0]


@dataclass
class DependencyGraph:
    """The groups of a model (``graph.groups``; see :func:`.graph.build_graph`) and what was not understood."""

    groups: list[Group]
    notes: list[str]
    #: per Conv2d/Linear: the L2 norm of each input column (a Linear's feature, a Conv2d's channel) over
    #: the recorded run, for activation-aware importance (Wanda, Sun et al. 2023)
    input_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    #: per Conv2d/Linear: the fraction of exact zeros in each input column (APoZ, Hu et al. 2016)
    input_zeros: dict[str, torch.Tensor] = field(default_factory=dict)
    #: per Conv2d/Linear: the variance of each input column over the recorded run (every sample and
    #: position, population variance), for FLAP's fluctuation metric (An et al. 2024)
    input_vars: dict[str, torch.Tensor] = field(default_factory=dict)
    #: per followed LayerNorm/RMSNorm: the epsilon it used (``nn.RMSNorm(eps=None)``: the input's)
    norm_eps: dict[str, float] = field(default_factory=dict)

    def group_of(self, module: str) -> Group | None:
        """The group of ``module``'s output channels (a producer or an Embedding; ``None`` if none)."""
        return next((g for g in self.groups if module in g.producers or module in g.embeddings), None)

    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.frozen is None]


__all__ = ["DependencyGraph", "Group", "Layout", "Segment", "Use"]
