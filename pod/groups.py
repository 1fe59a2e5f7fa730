"""Group specs: which layers share distant keys, and what that saves.

A :class:`GroupSpec` partitions the layers, separately for every KV head, into blocks of
consecutive layers. ``anchors[l][h]`` is the lowest layer of the block that holds layer ``l`` for
KV head ``h`` (its *anchor*). Distant tokens of layer ``l`` are attended with the anchor's keys.

This module is pure Python (``torch`` only for dtype sizes) so that it can be used anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["GroupSpec", "GroupSpecError", "kv_cache_bytes", "kv_saving", "n_distant"]


class GroupSpecError(ValueError):
    """A group spec that does not describe consecutive blocks of a model's layers."""


def n_distant(seq_len: int, n_sink: int, n_recent: int) -> int:
    """Number of cached positions that are distant for the next query after ``seq_len`` tokens.

    After ``seq_len`` tokens the cache keeps own keys for the first ``n_sink`` positions and for the
    last ``n_recent`` positions (the window of the last query processed); the rest are distant.
    """
    return max(0, seq_len - n_sink - n_recent)


def kv_saving(
    seq_len: int, n_sink: int, n_recent: int, num_anchors: int, num_layers: int, num_kv_heads: int
) -> float:
    """Fraction of the dense KV cache saved by PoD (METHOD.md section 4, ``anchor`` mode).

    ``1 - bytes_PoD / bytes_dense = (n_D / (2 n)) * (1 - B / (L H))``.
    """
    if seq_len <= 0:
        return 0.0
    n_d = n_distant(seq_len, n_sink, n_recent)
    return (n_d / (2 * seq_len)) * (1 - num_anchors / (num_layers * num_kv_heads))


@dataclass(frozen=True)
class GroupSpec:
    """Anchor layer per (layer, KV head): ``anchors[layer][kv_head]``.

    Blocks are consecutive: layer ``l`` either anchors its own block (``anchors[l][h] == l``) or
    continues the block of layer ``l - 1`` (``anchors[l][h] == anchors[l - 1][h]``).
    """

    anchors: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        anchors = tuple(tuple(int(a) for a in row) for row in self.anchors)
        object.__setattr__(self, "anchors", anchors)
        self._check()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def identity(cls, num_layers: int, num_kv_heads: int) -> GroupSpec:
        """Every layer is its own anchor: the original model, nothing shared."""
        return cls(tuple(tuple(layer for _ in range(num_kv_heads)) for layer in range(num_layers)))

    @classmethod
    def fixed(cls, num_layers: int, num_kv_heads: int, block_size: int) -> GroupSpec:
        """Blocks of ``block_size`` consecutive layers (the last block may be shorter)."""
        if block_size < 1:
            raise GroupSpecError(f"block_size must be >= 1, got {block_size}")
        return cls(
            tuple(
                tuple((layer // block_size) * block_size for _ in range(num_kv_heads))
                for layer in range(num_layers)
            )
        )

    @classmethod
    def from_block_starts(cls, starts_per_head: Sequence[Sequence[int]], num_layers: int) -> GroupSpec:
        """Build from the first layer of every block, one list per KV head (each must start at 0)."""
        columns = []
        for head, starts in enumerate(starts_per_head):
            starts = sorted(set(int(s) for s in starts))
            if not starts or starts[0] != 0:
                raise GroupSpecError(f"KV head {head}: the first block must start at layer 0, got {starts}")
            if starts[-1] >= num_layers:
                raise GroupSpecError(
                    f"KV head {head}: block start {starts[-1]} is not a layer of a {num_layers}-layer model"
                )
            column, current = [], 0
            start_set = set(starts)
            for layer in range(num_layers):
                if layer in start_set:
                    current = layer
                column.append(current)
            columns.append(column)
        return cls(tuple(tuple(col[layer] for col in columns) for layer in range(num_layers)))

    # ------------------------------------------------------------------ views
    @property
    def num_layers(self) -> int:
        return len(self.anchors)

    @property
    def num_kv_heads(self) -> int:
        return len(self.anchors[0])

    @property
    def num_anchors(self) -> int:
        """``B`` of METHOD.md: the number of (layer, KV head) pairs that anchor a block."""
        return sum(a == layer for layer, row in enumerate(self.anchors) for a in row)

    def is_anchor(self, layer: int, head: int) -> bool:
        return self.anchors[layer][head] == layer

    def blocks(self, head: int) -> list[tuple[int, int]]:
        """Blocks of KV head ``head`` as ``(first_layer, last_layer_exclusive)`` pairs."""
        starts = [layer for layer in range(self.num_layers) if self.is_anchor(layer, head)]
        return list(zip(starts, starts[1:] + [self.num_layers], strict=True))

    @property
    def per_layer(self) -> bool:
        """True when all KV heads of every layer share one anchor (per-layer grouping)."""
        return all(len(set(row)) == 1 for row in self.anchors)

    def mean_block_size(self) -> float:
        return self.num_layers * self.num_kv_heads / self.num_anchors

    def kv_saving(self, seq_len: int, n_sink: int, n_recent: int) -> float:
        """Theoretical fraction of the dense KV cache saved at context ``seq_len``."""
        return kv_saving(seq_len, n_sink, n_recent, self.num_anchors, self.num_layers, self.num_kv_heads)

    def describe(self) -> str:
        """One line per KV head with its blocks, e.g. ``head 0: [0-3] [4-4] [5-7]``."""
        lines = []
        for head in range(self.num_kv_heads):
            blocks = " ".join(f"[{a}-{b - 1}]" for a, b in self.blocks(head))
            lines.append(f"head {head}: {blocks}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ checks
    def _check(self) -> None:
        if not self.anchors or not self.anchors[0]:
            raise GroupSpecError("a group spec needs at least one layer and one KV head")
        width = len(self.anchors[0])
        for layer, row in enumerate(self.anchors):
            if len(row) != width:
                raise GroupSpecError(
                    f"layer {layer} has anchors for {len(row)} KV heads, layer 0 for {width}: "
                    "every layer needs one anchor per KV head"
                )
            for head, anchor in enumerate(row):
                if not 0 <= anchor <= layer:
                    raise GroupSpecError(
                        f"anchors[{layer}][{head}] = {anchor}: an anchor must be a layer in [0, {layer}] "
                        "(at or below the layer it serves)"
                    )
                if anchor != layer and self.anchors[layer - 1][head] != anchor:
                    raise GroupSpecError(
                        f"anchors[{layer}][{head}] = {anchor} but anchors[{layer - 1}][{head}] = "
                        f"{self.anchors[layer - 1][head]}: blocks must be consecutive layers, so a layer "
                        "either anchors itself or shares the anchor of the layer below"
                    )

    def check_model(self, num_layers: int, num_kv_heads: int) -> None:
        """Raise :class:`GroupSpecError` unless the spec fits a model of this shape."""
        if self.num_layers != num_layers or self.num_kv_heads != num_kv_heads:
            raise GroupSpecError(
                f"the group spec is for {self.num_layers} layers x {self.num_kv_heads} KV heads, "
                f"the model has {num_layers} layers x {num_kv_heads} KV heads"
            )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "anchors": [list(row) for row in self.anchors],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroupSpec:
        if "anchors" not in data:
            raise GroupSpecError("a group spec needs an 'anchors' field: a list (layers) of lists (KV heads)")
        spec = cls(tuple(tuple(row) for row in data["anchors"]))
        for key, value in (("num_layers", spec.num_layers), ("num_kv_heads", spec.num_kv_heads)):
            if key in data and int(data[key]) != value:
                raise GroupSpecError(f"'{key}' says {data[key]} but 'anchors' has {value}")
        return spec

    def to_json(self, **extra: Any) -> str:
        """JSON text; ``extra`` fields (e.g. the strategy that produced it) are stored alongside."""
        return json.dumps({**extra, **self.to_dict()}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> GroupSpec:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path, **extra: Any) -> None:
        Path(path).write_text(self.to_json(**extra) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> GroupSpec:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"group spec file not found: {path}")
        try:
            return cls.from_json(path.read_text())
        except json.JSONDecodeError as err:
            raise GroupSpecError(f"{path}: not valid JSON ({err})") from err
        except GroupSpecError as err:
            raise GroupSpecError(f"{path}: {err}") from err


def kv_cache_bytes(config: Any, seq_len: int, batch_size: int = 1, dtype: Any = None) -> int:
    """Theoretical bytes of a PoD KV cache holding ``seq_len`` tokens (METHOD.md section 4).

    ``config`` is a :class:`PodLlamaConfig` (or any object with the same fields); a plain Llama
    config gives the dense cache. Values are kept for every position; own keys for sink and
    recent-window positions; distant keys once per anchor (layer, KV head). In ``mean`` mode each
    anchor keeps its shared keys for every position, besides its own proximal keys. The baselines
    of ``distant_policy`` (``shared_kv``, ``drop``) are counted the same way.
    ``dtype`` defaults to the config's ``dtype`` (float32 when unset).
    """
    import torch

    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    num_layers = config.num_hidden_layers
    num_kv_heads = config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n = seq_len
    anchors = getattr(config, "anchors", None)
    if anchors is None:
        elements = 2 * num_layers * num_kv_heads * n
    else:
        b = GroupSpec(tuple(tuple(row) for row in anchors)).num_anchors
        n_d = n_distant(n, config.n_sink, config.n_recent)
        proximal = num_layers * num_kv_heads * (n - n_d)  # own entries of sink + window slots
        policy = getattr(config, "distant_policy", "shared")
        if policy == "drop":  # StreamingLLM-style: keys and values of proximal slots only
            elements = 2 * proximal
        elif policy == "shared_kv":  # CLA-style: distant keys and values once per anchor
            elements = 2 * (proximal + b * n_d)
        elif config.shared_key_init == "mean":  # shared keys of every slot per anchor, besides own keys
            elements = num_layers * num_kv_heads * n + proximal + b * n
        else:  # PoD: all values, own proximal keys, distant keys once per anchor
            elements = num_layers * num_kv_heads * n + proximal + b * n_d
    return elements * head_dim * batch_size * itemsize
