"""Sudoku boards for the paper's Sudoku experiment: complete boards, puzzles, one-hot tensors.

Everything is generated here from a seed, so the experiment downloads nothing.  A board of
box size ``b`` has side ``N = b*b`` (``b = 2``: 4x4, ``b = 3``: 9x9) and is an ``(N, N)``
integer array with digits ``1..N``; a puzzle is the same with ``0`` for a blank cell.

* :func:`complete_board` fills an empty board by randomised backtracking (the candidate order
  of every cell is drawn from the generator), so every complete board can come out.
* :func:`make_puzzle` blanks the cells of a complete board in a random order, keeping a blank
  only if the puzzle still has exactly one solution (checked by :func:`count_solutions`), and
  stops at ``min_givens`` givens or when no further cell can be blanked: the puzzle's unique
  solution is the board it came from.
* :func:`make_dataset` draws ``count`` (puzzle, solution) pairs from one
  ``numpy.random.default_rng(seed)``: the same seed gives the same arrays, on any machine.

The encodings follow OptNet's Sudoku experiment: :func:`one_hot` maps a board to an
``(N, N, N)`` array (row, column, digit) with a blank cell all zeros, and
:func:`constraint_matrix` gives the linear equalities a one-hot solution satisfies (one digit
per cell, each digit once per row, column and box), with :func:`independent_rows` selecting a
basis of its rows (40 of 64 rows for 4x4, 249 of 324 for 9x9): its row count is the size of
the learnable ``A`` of the experiment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _side(box: int) -> int:
    if not isinstance(box, int | np.integer) or box < 2:
        raise ValueError(f"box size must be an int >= 2, got {box!r}")
    return box * box


class _Grid:
    """Candidate bitmasks of rows, columns and boxes for backtracking (bit d-1 = digit d)."""

    def __init__(self, board: np.ndarray, box: int):
        n = _side(box)
        board = np.asarray(board)
        if board.shape != (n, n):
            raise ValueError(f"board must have shape ({n}, {n}) for box {box}, got {board.shape}")
        if board.min() < 0 or board.max() > n:
            raise ValueError(f"board entries must be 0 (blank) or 1..{n}")
        self.box, self.n = box, n
        self.cells = [[int(v) for v in row] for row in board]
        full = (1 << n) - 1
        self.row = [full] * n
        self.col = [full] * n
        self.blk = [full] * n
        self.consistent = True
        for r in range(n):
            for c in range(n):
                d = self.cells[r][c]
                if d:
                    bit = 1 << (d - 1)
                    k = (r // box) * box + c // box
                    if not (self.row[r] & self.col[c] & self.blk[k] & bit):
                        self.consistent = False  # a digit repeated in a row, column or box
                    self.row[r] &= ~bit
                    self.col[c] &= ~bit
                    self.blk[k] &= ~bit

    def candidates(self, r: int, c: int) -> int:
        return self.row[r] & self.col[c] & self.blk[(r // self.box) * self.box + c // self.box]

    def place(self, r: int, c: int, d: int, on: bool) -> None:
        bit = 1 << (d - 1)
        k = (r // self.box) * self.box + c // self.box
        if on:
            self.cells[r][c] = d
            self.row[r] &= ~bit
            self.col[c] &= ~bit
            self.blk[k] &= ~bit
        else:
            self.cells[r][c] = 0
            self.row[r] |= bit
            self.col[c] |= bit
            self.blk[k] |= bit

    def most_constrained(self) -> tuple[int, int, int] | None:
        """The blank cell with the fewest candidates ``(r, c, mask)``; None when full."""
        best = None
        for r in range(self.n):
            for c in range(self.n):
                if self.cells[r][c] == 0:
                    mask = self.candidates(r, c)
                    k = mask.bit_count()
                    if best is None or k < best[0]:
                        best = (k, r, c, mask)
                        if k <= 1:
                            return r, c, mask
        return None if best is None else best[1:]


def _digits(mask: int) -> list[int]:
    return [d + 1 for d in range(mask.bit_length()) if mask >> d & 1]


def count_solutions(puzzle: np.ndarray, box: int, limit: int | None = 2) -> int:
    """Number of complete boards that agree with ``puzzle``'s givens, counted up to ``limit``
    (``None``: all of them; the empty 4x4 board has 288).  A puzzle whose givens already
    repeat a digit in a row, column or box has 0."""
    g = _Grid(puzzle, box)
    if not g.consistent:
        return 0
    found = 0

    def search() -> bool:  # True: stop, the limit is reached
        nonlocal found
        cell = g.most_constrained()
        if cell is None:
            found += 1
            return limit is not None and found >= limit
        r, c, mask = cell
        for d in _digits(mask):
            g.place(r, c, d, True)
            stop = search()
            g.place(r, c, d, False)
            if stop:
                return True
        return False

    search()
    return found


def solve(puzzle: np.ndarray, box: int, rng: np.random.Generator | None = None):
    """One complete board agreeing with ``puzzle`` (candidates tried in the order drawn from
    ``rng``, or ascending without one), or ``None`` if there is none."""
    g = _Grid(puzzle, box)
    if not g.consistent:
        return None

    def search() -> bool:
        cell = g.most_constrained()
        if cell is None:
            return True
        r, c, mask = cell
        digits = _digits(mask)
        if rng is not None:
            digits = [digits[i] for i in rng.permutation(len(digits))]
        for d in digits:
            g.place(r, c, d, True)
            if search():
                return True
            g.place(r, c, d, False)
        return False

    return np.array(g.cells, dtype=np.int64) if search() else None


def complete_board(rng: np.random.Generator, box: int = 2) -> np.ndarray:
    """A random complete board of box size ``box`` (digits ``1..box**2``)."""
    n = _side(box)
    board = solve(np.zeros((n, n), dtype=np.int64), box, rng)
    assert board is not None  # the empty board always has a completion
    return board


def is_complete_board(board: np.ndarray, box: int) -> bool:
    """True if ``board`` is a filled board with every digit once per row, column and box."""
    n = _side(box)
    board = np.asarray(board)
    if board.shape != (n, n):
        return False
    digits = np.arange(1, n + 1)
    groups = list(board) + list(board.T)
    for i in range(0, n, box):
        for j in range(0, n, box):
            groups.append(board[i : i + box, j : j + box].ravel())
    return all(np.array_equal(np.sort(g), digits) for g in groups)


def make_puzzle(
    solution: np.ndarray, rng: np.random.Generator, box: int = 2, min_givens: int = 0
) -> np.ndarray:
    """A puzzle with exactly one solution, ``solution``: its cells are blanked in a random
    order, each blank kept only if the solution stays unique, until ``min_givens`` givens
    remain or no further cell can be blanked (a minimal puzzle)."""
    if not is_complete_board(solution, box):
        raise ValueError("solution is not a complete, valid board")
    n = _side(box)
    puzzle = np.array(solution, dtype=np.int64)
    givens = n * n
    for cell in rng.permutation(n * n):
        if givens <= min_givens:
            break
        r, c = divmod(int(cell), n)
        digit = puzzle[r, c]
        puzzle[r, c] = 0
        if count_solutions(puzzle, box, limit=2) == 1:
            givens -= 1
        else:
            puzzle[r, c] = digit
    return puzzle


@dataclass(frozen=True)
class Boards:
    """``count`` puzzles and their unique solutions, ``(count, N, N)`` int arrays."""

    box: int
    puzzles: np.ndarray
    solutions: np.ndarray

    @property
    def side(self) -> int:
        return self.box * self.box

    def __len__(self) -> int:
        return len(self.puzzles)


def make_dataset(count: int, box: int = 2, seed: int = 0, min_givens: int = 0) -> Boards:
    """``count`` (puzzle, solution) pairs drawn from ``numpy.random.default_rng(seed)``; each
    puzzle has exactly one solution, the board it was made from (:func:`make_puzzle`)."""
    n = _side(box)
    rng = np.random.default_rng(seed)
    puzzles = np.zeros((count, n, n), dtype=np.int64)
    solutions = np.zeros((count, n, n), dtype=np.int64)
    for i in range(count):
        solutions[i] = complete_board(rng, box)
        puzzles[i] = make_puzzle(solutions[i], rng, box, min_givens)
    return Boards(box, puzzles, solutions)


def one_hot(boards: np.ndarray, box: int) -> np.ndarray:
    """``(..., N, N)`` boards as ``(..., N, N, N)`` float64 one-hot arrays (row, column,
    digit); a blank cell (0) is all zeros."""
    n = _side(box)
    boards = np.asarray(boards)
    out = np.zeros(boards.shape + (n,), dtype=np.float64)
    for d in range(1, n + 1):
        out[..., d - 1][boards == d] = 1.0
    return out


def decode(one_hot_boards: np.ndarray) -> np.ndarray:
    """``(..., N, N, N)`` scores to ``(..., N, N)`` boards: the digit with the largest score
    of every cell (ties to the smaller digit)."""
    return np.asarray(one_hot_boards).argmax(axis=-1) + 1


def constraint_matrix(box: int) -> np.ndarray:
    """The ``(4 N^2, N^3)`` 0/1 matrix ``M`` with ``M z = 1`` for the one-hot ``z`` of every
    complete board (flattened in (row, column, digit) order): one digit per cell, and each
    digit once per row, once per column and once per box."""
    n = _side(box)

    def idx(r, c, d):
        return (r * n + c) * n + d

    rows = []
    for r in range(n):
        for c in range(n):
            rows.append([idx(r, c, d) for d in range(n)])
    for d in range(n):
        for r in range(n):
            rows.append([idx(r, c, d) for c in range(n)])
        for c in range(n):
            rows.append([idx(r, c, d) for r in range(n)])
        for i in range(0, n, box):
            for j in range(0, n, box):
                rows.append([idx(i + a, j + b, d) for a in range(box) for b in range(box)])
    M = np.zeros((len(rows), n**3))
    for k, cols in enumerate(rows):
        M[k, cols] = 1.0
    return M


def independent_rows(M: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """The rows of ``M`` kept, in order, when each is kept only if it raises the rank (a
    basis of the row space; Gram-Schmidt on the rows)."""
    basis: list[np.ndarray] = []
    keep = []
    for i, row in enumerate(np.asarray(M, dtype=np.float64)):
        v = row.copy()
        for u in basis:
            v -= (u @ v) * u
        norm = np.linalg.norm(v)
        if norm > tol * max(1.0, np.linalg.norm(row)):
            basis.append(v / norm)
            keep.append(i)
    return np.asarray(M)[keep]
