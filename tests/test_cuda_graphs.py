"""GraphedForward: eager pass-through on the CPU; on CUDA, graphed inference and training equal eager."""

import pytest
import torch

from monai.inferers import SliceInferer

from msa2net.cuda_graphs import GraphedForward, GraphedInferer, own_gradients
from msa2net.networks import create_msa2net

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return create_msa2net("tiny", in_channels=1, num_classes=3)


def test_cpu_inputs_run_the_module_itself():
    net = tiny()
    wrapped = GraphedForward(net)
    x = torch.randn(2, 1, 64, 64)
    net.eval(), wrapped.eval()
    with torch.no_grad():
        assert torch.equal(wrapped(x), net(x))
    assert [p is q for p, q in zip(wrapped.parameters(), net.parameters())] == [True] * len(list(net.parameters()))
    with pytest.raises(ValueError, match="warmup"):
        GraphedForward(net, warmup=0)


class _ReusedGradBuffer(torch.autograd.Function):
    """Returns its input gradient in one persistent buffer, detached: what a graphed backward does."""

    buffer = None

    @staticmethod
    def forward(ctx, w):
        return w * 3.0

    @staticmethod
    def backward(ctx, grad):
        _ReusedGradBuffer.buffer.copy_(grad * 3.0)
        return _ReusedGradBuffer.buffer.detach()


def _grads_over_steps(protect: bool, set_to_none: bool = False, accumulate: bool = False) -> list[float]:
    w = torch.nn.Parameter(torch.ones(4))
    _ReusedGradBuffer.buffer = torch.zeros(4)
    hooks = own_gradients(torch.nn.ParameterList([w])) if protect else []
    seen = []
    for _ in range(3):
        if w.grad is not None and not accumulate:
            if set_to_none:
                w.grad = None
            else:
                w.grad.zero_()  # zero_grad(set_to_none=False), MONAI's trainer default
        _ReusedGradBuffer.apply(w).sum().backward()
        seen.append(w.grad[0].item())
    for h in hooks:
        h.remove()
    return seen


def test_own_gradients_stop_a_reused_buffer_from_doubling_the_gradient():
    assert _grads_over_steps(protect=False) == [3.0, 6.0, 6.0]  # the hazard, as PyTorch behaves
    assert _grads_over_steps(protect=True) == [3.0, 3.0, 3.0]
    assert _grads_over_steps(protect=True, set_to_none=True) == [3.0, 3.0, 3.0]
    assert _grads_over_steps(protect=True, accumulate=True) == [3.0, 6.0, 9.0]  # accumulation still adds


@needs_cuda
def test_inference_graphs_equal_eager_per_shape():
    net = tiny().cuda().eval()
    wrapped = GraphedForward(net, max_graphs=2)
    with torch.no_grad():
        for b, size in ((4, 64), (3, 96), (4, 64), (2, 32)):
            x = torch.randn(b, 1, size, size, device="cuda")
            torch.testing.assert_close(wrapped(x), net(x), rtol=1e-4, atol=1e-4)
    assert len(wrapped._infer) == 2  # the third shape ran eagerly


def test_graphed_inferer_on_the_cpu_is_the_inferer_itself():
    net = tiny().eval()
    volume = torch.randn(1, 1, 64, 64, 5)
    inferer = SliceInferer(roi_size=(64, 64), spatial_dim=2, sw_batch_size=2, progress=False)
    with torch.no_grad():
        assert torch.equal(GraphedInferer(inferer)(volume, net), inferer(volume, net))


@needs_cuda
def test_graphed_inferer_pads_the_short_last_batch_into_the_full_batch_graph():
    net = tiny().cuda().eval()
    volume = torch.randn(1, 1, 64, 64, 70, device="cuda")  # slices in batches of 32, 32 and 6
    inferer = SliceInferer(roi_size=(64, 64), spatial_dim=2, sw_batch_size=32, progress=False)
    graphed = GraphedInferer(inferer)
    with torch.no_grad():
        torch.testing.assert_close(graphed(volume, net), inferer(volume, net), rtol=1e-3, atol=1e-3)  # TF32, batch-size-dependent kernels
        torch.testing.assert_close(graphed(volume[..., :5], net), inferer(volume[..., :5], net), rtol=1e-3, atol=1e-3)
    (wrapped,) = graphed._graphed.values()
    assert [k[0][0] for k in wrapped._infer] == [32]  # one graph: the short batches were padded into it


@needs_cuda
@pytest.mark.parametrize("copy_gradients, set_to_none", [(True, False), (False, True)])
def test_training_graph_follows_eager_steps(copy_gradients, set_to_none):
    torch.backends.cudnn.deterministic = True
    batches = [(torch.randn(4, 1, 64, 64, device="cuda"), torch.randint(0, 3, (4, 64, 64), device="cuda")) for _ in range(3)]
    losses = {}
    for graphed in (False, True):
        net = tiny().cuda().train()
        model = GraphedForward(net, copy_gradients=copy_gradients) if graphed else net
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        losses[graphed] = []
        for x, y in batches:
            opt.zero_grad(set_to_none=set_to_none)  # in place by default, as MONAI's SupervisedTrainer does
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses[graphed].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-3, atol=1e-4)


@needs_cuda
def test_bundle_inference_overlapped_on_cuda_equals_eager(tmp_path):
    """`run inference` on a GPU: cases overlap (read, infer, write in threads) and new graph shapes are
    captured while the next case is read; the label maps equal those of the eager network."""
    import nibabel as nib
    import numpy as np

    from msa2net.bundle_tools import run_workflow

    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for name, depth in (("a", 5), ("b", 40), ("c", 70)):  # slice batches 5; 32 + 8; 32 + 32 + 6
        nib.save(nib.Nifti1Image(rng.normal(size=(64, 64, depth)).astype(np.float32), np.diag([1.2, 1.1, 3.0, 1.0])), inputs / f"{name}.nii.gz")
    ckpt = tmp_path / "model.pt"
    torch.save({"model": create_msa2net("tiny", in_channels=1, num_classes=4).state_dict()}, ckpt)
    maps = {}
    for graphs in (True, False):
        out = tmp_path / f"out_{graphs}"
        run_workflow("inference", ["inference.json"], dataset_dir=str(inputs), output_dir=str(out), ckpt_path=str(ckpt),
                     model_preset="tiny", spatial_size=[64, 64], allow_input_mismatch=True, cuda_graphs=graphs)
        maps[graphs] = {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(out.glob("*_seg.nii.gz"))}
    assert sorted(maps[True]) == ["a_seg.nii.gz", "b_seg.nii.gz", "c_seg.nii.gz"]
    for name, labels in maps[True].items():
        assert labels.shape == maps[False][name].shape
        assert (labels == maps[False][name]).mean() > 0.999, name
