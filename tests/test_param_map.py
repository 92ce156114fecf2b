"""The batch data map: shared parameters once, batched ones per sample, exact adjoint."""
import numpy as np

from ffo_core.compile import compile_problem
from ffo_core.ffo_backward import DataGradient
from ffo_core.param_map import bind
from problems import random_qp


def test_bound_data_equals_full_product_and_its_adjoint():
    qp = random_qp(7, 5, 2, seed=4)
    cp_ = compile_problem(qp.problem, qp.params, [qp.y])
    rng = np.random.default_rng(0)
    batch, batched = 3, [False, True, False, True, False, True]
    values = [rng.standard_normal((batch, s.size) if b else s.size)
              for s, b in zip(cp_.params, batched)]
    bound = bind(cp_, values, batched, batch)
    theta = np.zeros((cp_.n_theta + 1, batch))
    theta[cp_.const_col] = 1.0
    for s, v, b in zip(cp_.params, values, batched):
        theta[s.offset:s.offset + s.size] = v.T if b else v[:, None]
    full = cp_.M @ theta
    for i in range(batch):
        assert np.allclose(bound.data(i), full[:, i], rtol=1e-13, atol=1e-13)
    d = [rng.standard_normal(cp_.n_data) for _ in range(batch)]
    sec = cp_.sections
    grads = bound.parameter_gradients(
        [DataGradient(*(v[sec[k]] for k in ("P", "q", "A", "b", "G", "h"))) for v in d])
    ref = cp_.M.T @ np.stack(d, axis=1)
    for s, g, b in zip(cp_.params, grads, batched):
        expect = ref[s.offset:s.offset + s.size]
        assert np.allclose(g, expect.T if b else expect.sum(axis=1), rtol=1e-12, atol=1e-12)
