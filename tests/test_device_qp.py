"""FFOQPLayer on a device backend (``pdipm``): the dense torch path agrees with the general
path and with closed forms, keeps tensors on their device, and the CUDA run happens where a
device is present."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ffo_core import FFOQPLayer, available_backends

pytestmark = pytest.mark.skipif(
    "pdipm" not in available_backends() or not available_backends()["pdipm"].available,
    reason="the pdipm backend is not installed",
)


def box(n, device="cpu", dtype=torch.float64):
    G = torch.cat([torch.eye(n), -torch.eye(n), torch.ones(1, n)])
    h = torch.cat([torch.zeros(n), torch.ones(n), torch.tensor([3.0])])
    return (torch.eye(n).to(device, dtype), G.to(device, dtype), h.to(device, dtype))


def test_device_path_matches_the_closed_form_near_kinks():
    n = 40
    Q, G, h = box(n)
    rng = np.random.default_rng(0)
    q, w = rng.standard_normal((8, n)), rng.standard_normal((8, n))
    qt = torch.tensor(q, requires_grad=True)
    layer = FFOQPLayer("pdipm")
    y = layer(Q, qt, G, h, None, None)
    (y * torch.tensor(w)).sum().backward()
    ref = -w * ((q > 0) & (q < 1))
    assert np.abs(y.detach().numpy() - np.clip(-q, -1, 0)).max() <= 1e-6
    assert np.linalg.norm(qt.grad.numpy() - ref) <= 1e-6 * np.linalg.norm(ref)
    assert all(p == "polished" for p in layer.last_polish)


def test_unpolished_samples_alone_get_the_central_ghost():
    """Samples whose point is not polished take a central difference; the ``-delta`` ghost
    batch holds those samples only (not dead ones, not polished ones), and every gradient
    still matches the closed form, dead samples' being zero."""
    n, B = 40, 6
    Q, G, h = box(n)
    rng = np.random.default_rng(2)
    q, w = rng.standard_normal((B, n)), rng.standard_normal((B, n))
    w[[2, 4]] = 0.0  # no loss reaches samples 2 and 4
    layer = FFOQPLayer("pdipm", polish=False)
    sizes = []
    inner = layer.backend.solve_batch

    def recording(batch, extra=None):
        sizes.append(batch.batch)
        return inner(batch, extra)

    layer.backend.solve_batch = recording
    qt = torch.tensor(q, requires_grad=True)
    y = layer(Q, qt, G, h, None, None)
    (y * torch.tensor(w)).sum().backward()
    assert sizes == [B, B, 4]  # forward, ghosts at +delta, ghosts at -delta: 0, 1, 3, 5
    ref = -w * ((q > 0) & (q < 1))
    assert np.linalg.norm(qt.grad.numpy() - ref) <= 1e-6 * np.linalg.norm(ref)
    assert np.all(qt.grad.numpy()[[2, 4]] == 0.0)

    # a -delta ghost that fails is named by its index in the whole batch (3, not 2)
    from ffo_core.errors import GhostProblemError
    from ffo_core.protocol import Status

    calls = []

    def failing(batch, extra=None):
        out = inner(batch, extra)
        calls.append(batch.batch)
        if len(calls) == 3:
            out.status = list(out.status)
            out.status[2] = Status.NUMERICAL_ERROR
        return out

    layer.backend.solve_batch = failing
    qt = torch.tensor(q, requires_grad=True)
    y = layer(Q, qt, G, h, None, None)
    with pytest.raises(GhostProblemError, match="batch index 3:") as err:
        (y * torch.tensor(w)).sum().backward()
    assert err.value.batch_index == 3


def test_device_path_gradients_and_duals_match_the_general_path():
    rng = np.random.default_rng(1)
    n, m, p = 6, 8, 2
    F = rng.standard_normal((n, n))
    G = rng.standard_normal((m, n))
    y0 = rng.standard_normal(n)
    A = rng.standard_normal((p, n))
    data = [F @ F.T + np.eye(n), rng.standard_normal((3, n)), G,
            G @ y0 + rng.uniform(0, 1, m) * (rng.random(m) < 0.5), A, A @ y0]  # fmt: skip
    grads = {}
    for name in ("pdipm", "clarabel"):
        ts = [torch.tensor(v, requires_grad=True) for v in data]
        y, lam, nu = FFOQPLayer(name, duals=True)(*ts)
        (y.sum() + 0.3 * lam.sum() + 0.2 * nu.sum()).backward()
        grads[name] = torch.cat([t.grad.flatten() for t in ts])
    ref = grads["clarabel"]
    assert torch.norm(grads["pdipm"] - ref) <= 1e-6 * torch.norm(ref)


def test_float32_inputs_are_solved_in_float32():
    n = 10
    Q, G, h = box(n, dtype=torch.float32)
    q = torch.randn(4, n, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = FFOQPLayer("pdipm")(Q, q, G, h, None, None)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_tensors_stay_on_the_device():
    n = 20
    Q, G, h = box(n, device="cuda")
    q = torch.randn(16, n, device="cuda", dtype=torch.float64, requires_grad=True)
    y = FFOQPLayer("pdipm")(Q, q, G, h, None, None)
    assert y.device.type == "cuda"
    y.sum().backward()
    assert q.grad.device.type == "cuda"
    ref = FFOQPLayer("clarabel")(Q.cpu(), q.detach().cpu(), G.cpu(), h.cpu(), None, None)
    assert torch.allclose(y.detach().cpu(), ref, atol=1e-6)
