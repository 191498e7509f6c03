"""The same computations on a CUDA device as on the CPU ("CPU first, GPU ready").

Skipped where torch sees no GPU (CI has none); on a machine with one, ``pytest tests/test_cuda.py`` compares every
sparse kernel and its gradients, every registered model's forward, loss and parameter gradients, the evaluator's
metrics and one stored training run against the CPU's. Float32 sums run in another order on the GPU, so values are
compared with a tolerance, not bit for bit (the matmuls run in full float32: torch leaves TF32 off for them).
"""

from __future__ import annotations

import copy

import pytest
import torch

from grcn_bench.benchmarks.config import Cell, TrainSettings
from grcn_bench.benchmarks.evaluator import evaluate
from grcn_bench.benchmarks.runner import run_cell
from grcn_bench.benchmarks.store import ResultStore
from grcn_bench.datasets import load_dataset
from grcn_bench.datasets.base import RecDataset
from grcn_bench.models import Recommender, available_models, get_model
from grcn_bench.models.ops import sparse
from grcn_bench.models.ops.sparse import CSRPattern, sddmm, segment_softmax, spmm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def assert_same(cpu: torch.Tensor, cuda: torch.Tensor, what: str) -> None:
    assert cuda.device.type == "cuda", f"{what} left the GPU"
    torch.testing.assert_close(cuda.cpu(), cpu, **TOLERANCE, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def tiny() -> RecDataset:
    return load_dataset("synthetic:tiny")


@pytest.fixture(scope="module")
def tiny_words() -> RecDataset:
    return load_dataset("synthetic:tiny?text=words")


def random_pattern(num_rows: int, num_cols: int, density: float, generator: torch.Generator) -> CSRPattern:
    """Distinct entries in CSR order, with an empty row and an empty column (segments with nothing to sum)."""
    mask = torch.rand(num_rows, num_cols, generator=generator) < density
    mask[0], mask[:, 0] = False, False
    row, col = mask.nonzero(as_tuple=True)
    return CSRPattern.from_coo(row, col, num_rows, num_cols)


def pattern_on(pattern: CSRPattern, device: torch.device) -> CSRPattern:
    return CSRPattern(*(t.to(device) for t in (pattern.rowptr, pattern.col, pattern.t_rowptr, pattern.t_col,
                                                pattern.t_perm)), pattern.num_rows, pattern.num_cols)


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "per-channel"])
@pytest.mark.parametrize("channels", [0, 3], ids=["one", "channel-major"])
def test_sparse_products_and_gradients_match_the_cpu(monkeypatch, stacked, channels):
    monkeypatch.setattr(sparse, "STACK_BELOW_BYTES", (1 << 40) if stacked else 0)
    generator = torch.Generator().manual_seed(0)
    pattern = random_pattern(37, 29, 0.3, generator)
    lead = (channels,) if channels else ()
    values = torch.randn(*lead, pattern.nnz, generator=generator)
    x = torch.randn(*lead, pattern.num_cols, 8, generator=generator)
    a = torch.randn(*lead, pattern.num_rows, 8, generator=generator)
    upstream_y = torch.randn(*lead, pattern.num_rows, 8, generator=generator)
    upstream_z = torch.randn(*lead, pattern.nnz, generator=generator)

    def run(device: torch.device) -> list[torch.Tensor]:
        inputs = [t.detach().to(device).requires_grad_() for t in (values, x, a)]  # fresh leaves on either device
        on_device = pattern_on(pattern, device)
        y = spmm(on_device, inputs[0], inputs[1])
        z = sddmm(on_device, inputs[2], inputs[1])
        ((y * upstream_y.to(device)).sum() + (z * upstream_z.to(device)).sum()).backward()
        return [y, z, *(t.grad for t in inputs)]

    for name, cpu, cuda in zip(["spmm", "sddmm", "d values", "d x", "d a"], run(torch.device("cpu")), run(CUDA),
                               strict=True):
        assert_same(cpu.detach(), cuda.detach(), name)


def test_segment_softmax_and_its_gradient_match_the_cpu():
    generator = torch.Generator().manual_seed(1)
    ptr = torch.tensor([0, 3, 3, 7, 12])  # segment 1 is empty
    src = torch.randn(12, 4, generator=generator)
    upstream = torch.randn(12, 4, generator=generator)

    def run(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        logits = src.detach().to(device).requires_grad_()
        out = segment_softmax(logits, ptr.to(device))
        (out * upstream.to(device)).sum().backward()
        return out.detach(), logits.grad

    for name, cpu, cuda in zip(["softmax", "gradient"], run(torch.device("cpu")), run(CUDA), strict=True):
        assert_same(cpu, cuda, name)


def forward_loss_backward(model: Recommender, dataset: RecDataset, device: torch.device):
    """Embeddings, loss and parameter gradients of one batch in eval mode (no dropout: same function on both)."""
    generator = torch.Generator().manual_seed(2)
    pairs = dataset.train[torch.randperm(dataset.train.size(0), generator=generator)[:64]]
    neg = torch.randint(0, dataset.num_items, (pairs.size(0),), generator=generator)
    model = copy.deepcopy(model).to(device).eval()
    emb = model(dataset.graph().to(device))
    loss = model.loss(emb, *(t.to(device) for t in (pairs[:, 0], pairs[:, 1], neg)), 1e-2)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return emb, loss.detach(), grads


GRCN_OPTIONS = [{"variant": "official"}, {"fusion": "mean"}, {"pruning": "hard"}, {"content_readout": "one_hop"}]


@pytest.mark.parametrize(
    "name, options",
    [(name, {}) for name in available_models()] + [("grcn", options) for options in GRCN_OPTIONS],
    ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={o}" for k, o in v.items()),
)
def test_every_model_computes_the_same_on_cuda(tiny, name, options):
    torch.manual_seed(0)
    model = get_model(name)(tiny.info(), **options)
    cpu_emb, cpu_loss, cpu_grads = forward_loss_backward(model, tiny, torch.device("cpu"))
    cuda_emb, cuda_loss, cuda_grads = forward_loss_backward(model, tiny, CUDA)
    assert_same(cpu_emb.user, cuda_emb.user, "user embeddings")
    assert_same(cpu_emb.item, cuda_emb.item, "item embeddings")
    if cpu_emb.edge_weight is not None:
        assert_same(cpu_emb.edge_weight, cuda_emb.edge_weight, "edge weights")
    assert_same(cpu_loss, cuda_loss, "loss")
    assert cpu_grads.keys() == cuda_grads.keys() and cpu_grads
    for parameter, grad in cpu_grads.items():
        assert_same(grad, cuda_grads[parameter], f"gradient of {parameter}")


def test_word_text_grcn_computes_the_same_on_cuda(tiny_words):
    torch.manual_seed(0)
    model = get_model("grcn")(tiny_words.info())
    cpu = forward_loss_backward(model, tiny_words, torch.device("cpu"))
    cuda = forward_loss_backward(model, tiny_words, CUDA)
    assert_same(cpu[1], cuda[1], "loss")
    assert_same(cpu[2]["word_embedding"], cuda[2]["word_embedding"], "gradient of the word table")


@pytest.mark.parametrize("name", ["grcn", "mf"])
def test_evaluation_on_cuda_gives_the_cpu_metrics(tiny, name):
    torch.manual_seed(0)
    model = get_model(name)(tiny.info())
    cpu = evaluate(model, tiny, "test", ks=(5, 10, 20), keep_top_items=True)
    cuda = evaluate(copy.deepcopy(model).to(CUDA), tiny, "test", ks=(5, 10, 20), keep_top_items=True)
    assert (cuda.users == cpu.users).all() and cuda.per_user.keys() == cpu.per_user.keys()
    for metric, values in cpu.per_user.items():
        assert cuda.per_user[metric] == pytest.approx(values, abs=1e-9), metric
    assert (cuda.top_items == cpu.top_items).all()


def test_a_stored_cuda_run_follows_the_cpu_run(tiny, tmp_path):
    settings = TrainSettings(lr=1e-2, max_epochs=3, patience=10, batch_size=256)
    cell = Cell(model="grcn", dataset="synthetic:tiny", settings=settings)
    cpu = run_cell(cell, ResultStore(tmp_path / "cpu"), progress=False, dataset_loader=lambda spec: tiny)
    cuda = run_cell(cell, ResultStore(tmp_path / "cuda"), device="cuda", progress=False,
                    dataset_loader=lambda spec: tiny)
    assert cpu["status"] == cuda["status"] == "ok", cuda.get("error")
    assert cuda["environment"]["device"] == "cuda" and cuda["peak_gpu_bytes"] > 0
    cpu_losses = [epoch["loss"] for epoch in cpu["history"]]
    cuda_losses = [epoch["loss"] for epoch in cuda["history"]]
    assert cuda_losses == pytest.approx(cpu_losses, rel=1e-3)
