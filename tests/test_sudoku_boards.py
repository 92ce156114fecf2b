"""The Sudoku generator of the paper experiment (benchmarks/paper/boards.py).

Uniqueness on 4x4 boards is checked against an independent brute force: the list of all
288 complete 4x4 boards, built from row permutations and :func:`is_complete_board` alone
(no backtracking solver).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks.paper import boards as B


@pytest.fixture(scope="module")
def all_4x4():
    """Every complete 4x4 board, by brute force over row permutations."""
    perms = [np.array(p) for p in itertools.permutations(range(1, 5))]
    found = []

    def rows_ok(rows):
        cols = np.array(rows).T
        if any(len(set(c)) != len(c) for c in cols):
            return False
        if len(rows) in (2, 4):  # a band of boxes is complete
            band = np.array(rows[-2:])
            return all(len(set(band[:, j : j + 2].ravel())) == 4 for j in (0, 2))
        return True

    def extend(rows):
        if len(rows) == 4:
            found.append(np.array(rows))
            return
        for p in perms:
            if rows_ok([*rows, p]):
                extend([*rows, p])

    extend([])
    return np.array(found)


def matches(all_boards, puzzle):
    mask = puzzle > 0
    return [b for b in all_boards if np.array_equal(b[mask], puzzle[mask])]


def test_brute_force_list_is_the_288_boards(all_4x4):
    assert len(all_4x4) == 288
    assert all(B.is_complete_board(b, 2) for b in all_4x4)
    assert B.count_solutions(np.zeros((4, 4), dtype=int), 2, limit=None) == 288


def test_complete_boards_are_valid():
    rng = np.random.default_rng(1)
    for box in (2, 3):
        for _ in range(20):
            assert B.is_complete_board(B.complete_board(rng, box), box)


def test_is_complete_board_rejects_invalid():
    rng = np.random.default_rng(2)
    b = B.complete_board(rng, 3)
    bad = b.copy()
    bad[0, 0], bad[0, 1] = bad[0, 1], bad[0, 0]  # the columns now repeat digits
    assert not B.is_complete_board(bad, 3)
    assert not B.is_complete_board(b[:8], 3)
    blank = b.copy()
    blank[4, 4] = 0
    assert not B.is_complete_board(blank, 3)


def test_4x4_puzzles_unique_and_minimal(all_4x4):
    data = B.make_dataset(60, box=2, seed=3)
    for puzzle, solution in zip(data.puzzles, data.solutions):
        assert B.is_complete_board(solution, 2)
        mask = puzzle > 0
        assert np.array_equal(puzzle[mask], solution[mask])  # givens come from the solution
        sols = matches(all_4x4, puzzle)
        assert len(sols) == 1 and np.array_equal(sols[0], solution)  # unique, independently
        # minimal: blanking any remaining given admits a second solution
        for r, c in zip(*np.nonzero(puzzle)):
            fewer = puzzle.copy()
            fewer[r, c] = 0
            assert len(matches(all_4x4, fewer)) > 1


def test_9x9_puzzles_unique():
    data = B.make_dataset(4, box=3, seed=5, min_givens=30)
    for puzzle, solution in zip(data.puzzles, data.solutions):
        assert B.is_complete_board(solution, 3)
        assert (puzzle > 0).sum() == 30
        mask = puzzle > 0
        assert np.array_equal(puzzle[mask], solution[mask])
        assert B.count_solutions(puzzle, 3, limit=2) == 1
        assert np.array_equal(B.solve(puzzle, 3), solution)


def test_count_solutions_sees_two_and_none():
    # two 2x2 digit swaps in a 4x4 board: blanking the four cells leaves two completions
    sol = np.array([[1, 2, 3, 4], [3, 4, 1, 2], [2, 1, 4, 3], [4, 3, 2, 1]])
    assert B.is_complete_board(sol, 2)
    p = sol.copy()
    p[0, 0] = p[0, 1] = p[2, 0] = p[2, 1] = 0  # 1 2 / 2 1 in columns 0-1 can swap
    assert B.count_solutions(p, 2, limit=None) == 2
    clash = np.zeros((4, 4), dtype=int)
    clash[0, 0] = clash[0, 3] = 1
    assert B.count_solutions(clash, 2) == 0 and B.solve(clash, 2) is None


def test_dataset_is_deterministic():
    a = B.make_dataset(30, box=2, seed=11)
    b = B.make_dataset(30, box=2, seed=11)
    c = B.make_dataset(30, box=2, seed=12)
    assert np.array_equal(a.puzzles, b.puzzles) and np.array_equal(a.solutions, b.solutions)
    assert not np.array_equal(a.solutions, c.solutions)
    # a fixed seed gives fixed boards on every machine (numpy's PCG64 stream is stable)
    assert a.solutions[0].tolist() == B.make_dataset(1, box=2, seed=11).solutions[0].tolist()


def test_one_hot_and_decode_round_trip():
    data = B.make_dataset(5, box=2, seed=0)
    oh = B.one_hot(data.solutions, 2)
    assert oh.shape == (5, 4, 4, 4) and np.all(oh.sum(-1) == 1)
    assert np.array_equal(B.decode(oh), data.solutions)
    blanks = B.one_hot(data.puzzles, 2).sum(-1)
    assert np.array_equal(blanks, (data.puzzles > 0).astype(float))


@pytest.mark.parametrize("box, rank", [(2, 40), (3, 249)])
def test_constraint_matrix(box, rank):
    M = B.constraint_matrix(box)
    n = box * box
    assert M.shape == (4 * n * n, n**3)
    data = B.make_dataset(3, box=box, seed=0, min_givens=40 if box == 3 else 0)
    for sol in data.solutions:
        z = B.one_hot(sol, box).ravel()
        np.testing.assert_array_equal(M @ z, 1.0)
    R = B.independent_rows(M)
    assert R.shape == (rank, n**3) and np.linalg.matrix_rank(R) == rank
    assert np.linalg.matrix_rank(M) == rank
    wrong = data.solutions[0].copy()
    wrong[0, 0] = wrong[0, 0] % n + 1
    assert not np.allclose(M @ B.one_hot(wrong, box).ravel(), 1.0)
