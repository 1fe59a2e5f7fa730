"""GroupSpec: structure checks, constructors, JSON round trip, the KV-saving formula."""

from __future__ import annotations

import pytest

from pod import GroupSpec, GroupSpecError, kv_saving


def test_constructors_agree():
    fixed = GroupSpec.fixed(7, 2, 3)
    assert fixed == GroupSpec.from_block_starts([[0, 3, 6], [0, 3, 6]], 7)
    assert fixed.blocks(0) == [(0, 3), (3, 6), (6, 7)]
    assert fixed.num_anchors == 6 and fixed.per_layer
    assert GroupSpec.identity(4, 3).num_anchors == 12
    assert GroupSpec.identity(4, 3).kv_saving(1000, 4, 8) == 0.0


def test_per_head_blocks_and_describe():
    spec = GroupSpec.from_block_starts([[0, 2], [0, 1, 3]], 4)
    assert spec.anchors == ((0, 0), (0, 1), (2, 1), (2, 3))
    assert not spec.per_layer
    assert spec.describe().splitlines() == ["head 0: [0-1] [2-3]", "head 1: [0-0] [1-2] [3-3]"]
    assert spec.mean_block_size() == pytest.approx(8 / 5)


def test_json_round_trip(tmp_path):
    spec = GroupSpec.from_block_starts([[0, 2], [0, 1, 3]], 4)
    assert GroupSpec.from_json(spec.to_json()) == spec
    spec.save(tmp_path / "g.json", strategy="greedy", delta=0.5)
    assert GroupSpec.load(tmp_path / "g.json") == spec


def test_kv_saving_matches_the_paper_formula():
    # 32 layers, 8 KV heads, blocks of 4 -> B = 64; 32K context, 4096 proximal tokens.
    spec = GroupSpec.fixed(32, 8, 4)
    n, n_d = 32768, 32768 - 4096
    assert spec.kv_saving(n, 16, 4080) == pytest.approx((n_d / (2 * n)) * (1 - 64 / 256))
    assert kv_saving(100, 16, 4080, 1, 2, 2) == 0.0  # nothing is distant yet


@pytest.mark.parametrize(
    ("anchors", "message"),
    [
        ([[0], [2]], "at or below"),
        ([[0], [0], [1]], "consecutive"),
        ([[0, 0], [1]], "one anchor per KV head"),
        ([], "at least one layer"),
    ],
)
def test_invalid_specs_are_refused(anchors, message):
    with pytest.raises(GroupSpecError, match=message):
        GroupSpec(tuple(tuple(r) for r in anchors))


def test_bad_files_are_reported_with_their_path(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(GroupSpecError, match="bad.json"):
        GroupSpec.load(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        GroupSpec.load(tmp_path / "missing.json")
    bad.write_text('{"num_layers": 3, "anchors": [[0], [0]]}')
    with pytest.raises(GroupSpecError, match="num_layers"):
        GroupSpec.load(bad)
    with pytest.raises(GroupSpecError, match="block_size"):
        GroupSpec.fixed(4, 1, 0)
