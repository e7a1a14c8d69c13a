"""The numbered row file and each worker's rows of each step (no Ray): every sample once per epoch across the workers,
the same rows per global step however the batch is split or grouped by length, and reads by id from local or S3."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from ray_zephyr.train.rows import Layout, RowFile, split_by_tokens, write_rows


def _steps(layout: Layout, epoch: int, lengths=None) -> list[set[int]]:
    """The set of samples of each global step, gathered over the workers."""
    per_rank = [layout.rank_sample_ids(epoch, r, 0, lengths).reshape(-1, layout.micro_batch * layout.accumulation)
                for r in range(layout.world_size)]
    return [set(np.concatenate([ids[s] for ids in per_rank]).tolist()) for s in range(layout.steps_per_epoch)]


@pytest.mark.parametrize("grouped", [False, True])
def test_every_sample_once_per_epoch_and_steps_independent_of_the_split(grouped):
    lengths = np.random.default_rng(1).integers(5, 500, 103)
    two = Layout(103, micro_batch=4, world_size=2, accumulation=2, seed=7, shuffle=True)
    one = Layout(103, micro_batch=4, world_size=1, accumulation=4, seed=7, shuffle=True)
    for epoch in (0, 1):
        steps = _steps(two, epoch, lengths if grouped else None)
        assert len(steps) == 6 and all(len(s) == 16 for s in steps)
        assert len(set().union(*steps)) == 96  # 6 global batches of 16, each sample at most once
        assert steps == _steps(one, epoch, lengths if grouped else None) == _steps(two, epoch)
    assert _steps(two, 0) != _steps(two, 1)


def test_grouped_micro_batches_hold_rows_of_similar_length():
    lengths = np.random.default_rng(2).integers(5, 500, 64)
    layout = Layout(64, micro_batch=4, world_size=2, accumulation=2, seed=0, shuffle=True)
    for rank in (0, 1):
        ids = layout.rank_sample_ids(0, rank, 0, lengths).reshape(-1, 2, 4)  # step, micro-batch, row
        assert (np.diff(lengths[ids], axis=-1) <= 0).all()  # longest first within each micro-batch
        assert (lengths[ids[:, 0]].min(-1) >= lengths[ids[:, 1]].max(-1)).all()  # and across a worker's micro-batches
    resumed = layout.rank_sample_ids(0, 1, 3, lengths)
    assert (resumed == layout.rank_sample_ids(0, 1, 0, lengths)[3 * 8 :]).all()  # a resume continues the same order


@pytest.mark.parametrize("grouped", [False, True])
def test_token_budget_micro_batches_fit_the_budget_and_keep_each_step(grouped):
    """With train.micro_batch_tokens each worker's rows of a step are cut into micro-batches of at most the budget
    (a row longer than it alone), every worker runs as many micro-batches, and each step trains on the same rows as
    with B-row micro-batches, so resuming and the W x A split behave as before."""
    lengths = np.random.default_rng(3).integers(5, 500, 200)
    budget = 700
    plain = Layout(200, micro_batch=4, world_size=2, accumulation=3, seed=5, shuffle=True)
    budgeted = Layout(200, micro_batch=4, world_size=2, accumulation=3, seed=5, shuffle=True, micro_batch_tokens=budget)
    per_rank = [budgeted.rank_micro_batches(1, r, 0, lengths, grouped) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == plain.steps_per_epoch
    counts = set()
    for rank, steps in enumerate(per_rank):
        expected = plain.rank_micro_batches(1, rank, 0, lengths, grouped)
        for step, micro_batches in enumerate(steps):
            assert len(micro_batches) == len(per_rank[1 - rank][step])  # as many forwards on every worker
            assert sorted(np.concatenate(micro_batches).tolist()) == sorted(np.concatenate(expected[step]).tolist())
            for ids in micro_batches:
                assert len(ids) >= 1 and (lengths[ids].sum() <= budget or len(ids) == 1)
            counts.add(len(micro_batches))
    assert len(counts) > 1  # the count follows the tokens, not a fixed accumulation
    resumed = budgeted.rank_micro_batches(1, 1, 5, lengths, grouped)
    assert [m.tolist() for s in resumed for m in s] == [m.tolist() for s in per_rank[1][5:] for m in s]


def test_split_by_tokens_takes_the_fewest_runs_in_order():
    lengths = np.array([300, 300, 300, 900, 100, 100])
    runs = split_by_tokens(np.arange(6), lengths, 700)
    assert [r.tolist() for r in runs] == [[0, 1], [2], [3], [4, 5]]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_row_file_reads_rows_by_id(where, tmp_path, request):
    folder = f"{request.getfixturevalue('s3')}/data/train" if where == "s3" else str(tmp_path / "train")
    tokens = [[i] * (1 + i % 7) for i in range(50)]
    table = pa.table({"input_ids": tokens, "labels": tokens})
    assert write_rows(iter(table.to_batches(max_chunksize=16)), folder) == 50
    rows = RowFile(folder)
    assert rows.lengths.tolist() == [len(t) for t in tokens]
    batches = list(rows.micro_batches([np.array([49, 3]), np.array([17, 0]), np.array([8])]))
    assert [b["sample_id"].tolist() for b in batches] == [[49, 3], [17, 0], [8]]
    assert [list(x) for x in batches[0]["input_ids"]] == [tokens[49], tokens[3]]
