"""lm_loss must equal F.cross_entropy(F.linear(h, W), y) in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from modules.losses import lm_loss


def reference(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, w).reshape(-1, w.size(0)), y.reshape(-1), ignore_index=ignore_index)


def grads(fn, h, w, y):
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    loss = fn(h, w, y)
    (loss * 1.7).backward()  # a non-unit upstream gradient must be honoured
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 1000])
def test_matches_cross_entropy_values_and_grads(chunk_size: int) -> None:
    g = torch.Generator().manual_seed(0)
    B, T, d, V = 3, 7, 16, 97  # N = 21 is not a multiple of most chunk sizes
    h = torch.randn(B, T, d, generator=g)
    w = torch.randn(V, d, generator=g) * 0.5
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :3] = -100
    y[2, -1] = -100
    ref = grads(reference, h, w, y)
    ours = grads(lambda a, b, c: lm_loss(a, b, c, chunk_size=chunk_size), h, w, y)
    for r, o in zip(ref, ours):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    assert ours[1][0, :3].abs().max() == 0  # ignored positions get no gradient


def test_flat_input_custom_ignore_index_and_no_grad() -> None:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(10, 8, generator=g)
    w = torch.randn(50, 8, generator=g)
    y = torch.randint(0, 50, (10,), generator=g)
    y[4] = 7  # the ignore index below: a real id used as the pad id
    with torch.no_grad():
        got = lm_loss(h, w, y, ignore_index=7, chunk_size=3)
    torch.testing.assert_close(got, reference(h, w, y, ignore_index=7))


def test_only_hidden_requires_grad() -> None:
    g = torch.Generator().manual_seed(2)
    h = torch.randn(6, 8, generator=g, requires_grad=True)
    w = torch.randn(20, 8, generator=g)
    y = torch.randint(0, 20, (6,), generator=g)
    lm_loss(h, w, y, chunk_size=4).backward()
    h2 = h.detach().clone().requires_grad_(True)
    reference(h2, w, y).backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)


def test_shape_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="do not match"):
        lm_loss(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="width"):
        lm_loss(torch.zeros(2, 4), torch.zeros(5, 3), torch.zeros(2, dtype=torch.long))


def test_bf16_autocast_close_to_float32() -> None:
    """Under bf16 autocast (the CUDA training path) the loss and gradients stay close to float32."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(12, 32, generator=g)
    w = torch.randn(64, 32, generator=g) * 0.2
    y = torch.randint(0, 64, (12,), generator=g)
    ref = grads(reference, h, w, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grads(lambda a, b, c: lm_loss(a, b, c, chunk_size=5), h, w, y)
    assert all(t.dtype == torch.float32 for t in got)
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, rtol=0.05, atol=0.02)


def test_second_backward_is_refused_clearly() -> None:
    """The gradients are computed in forward and handed over (scaled in place) by the first
    backward, so a second one (retain_graph) raises instead of returning wrong numbers."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(6, 8, generator=g, requires_grad=True)
    w = torch.randn(20, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 20, (6,), generator=g)
    loss = lm_loss(h, w, y, chunk_size=4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_tied_weight_gradients_add_up() -> None:
    """The weight is used twice (embedding lookup and LM head, as in GPT-2): both gradients
    reach it, summed, as with the full-logits reference."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(30, 8, generator=g)
    ids = torch.randint(0, 30, (2, 7), generator=g)

    def run(loss_fn):
        wt = w.clone().requires_grad_(True)
        h = torch.tanh(F.embedding(ids, wt))  # (B, T, d)
        loss_fn(h[:, :-1], wt, ids[:, 1:]).backward()
        return wt.grad

    torch.testing.assert_close(run(lambda a, b, c: lm_loss(a, b, c, chunk_size=3)), run(reference),
                               rtol=1e-5, atol=1e-6)


def test_no_gradient_work_under_no_grad() -> None:
    """Evaluation under ``torch.no_grad()`` computes only the loss: one (V, c) logits product per
    chunk, no gradient products and no (V, d) weight-gradient buffer (it used to build both,
    the cost of a backward pass, because the inputs still require grad)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[tuple[str, tuple[int, ...]]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in inputs:  # new memory
                self.ops.append((str(func.overloadpacket.__name__), tuple(out.shape)))
            return out

    g = torch.Generator().manual_seed(0)
    N, d, V, chunk = 24, 16, 97, 8
    h = torch.randn(N, d, generator=g).requires_grad_(True)
    w = torch.randn(V, d, generator=g).requires_grad_(True)
    y = torch.randint(0, V, (N,), generator=g)
    with torch.no_grad(), Record() as rec:
        loss = lm_loss(h, w, y, chunk_size=chunk)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference(h.detach(), w.detach(), y))
    products = [op for op, _ in rec.ops if op in ("mm", "addmm", "addmm_", "matmul", "bmm")]
    assert len(products) == N // chunk  # the logits of each chunk, nothing else
    assert (V, d) not in [shape for _, shape in rec.ops]
    assert (N, d) not in [shape for _, shape in rec.ops]  # no hidden-state gradient either
