"""GradientAllReduce with a real process group (gloo, two processes on the CPU)."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from msa2net.data_parallel import GradientAllReduce


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different initial weights on purpose: broadcast must align them
        net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        handler = GradientAllReduce(net)
        handler.broadcast()
        g = torch.Generator().manual_seed(100 + rank)  # each process its own batches
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        steps = []
        for _ in range(3):  # as MONAI's trainer: gradients zeroed in place, then backward, all-reduce, step
            opt.zero_grad(set_to_none=False)
            net(torch.randn(8, 4, generator=g)).pow(2).sum().backward()
            local = [p.grad.clone() for p in net.parameters()]
            handler.all_reduce()
            steps.append({"local": local, "averaged": [p.grad.clone() for p in net.parameters()], "flat": handler._flat.data_ptr()})
            opt.step()
        out[rank] = {"weights": [p.detach().clone() for p in net.parameters()], "steps": steps}
    finally:
        dist.destroy_process_group()


def test_weights_broadcast_and_gradients_averaged():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        r0, r1 = out[0], out[1]
    for a, b in zip(r0["weights"], r1["weights"]):
        assert torch.equal(a, b)  # broadcast first, then identical averaged steps keep them equal
    for s0, s1 in zip(r0["steps"], r1["steps"]):
        for l0, l1, a0, a1 in zip(s0["local"], s1["local"], s0["averaged"], s1["averaged"]):
            assert not torch.allclose(l0, l1)  # the two batches really differ
            torch.testing.assert_close(a0, (l0 + l1) / 2)
            assert torch.equal(a0, a1)
    # after the first step the gradients live in one buffer that autograd fills in place
    assert len({s["flat"] for s in r0["steps"]}) == 1


def test_without_a_process_group_nothing_changes():
    net = torch.nn.Linear(3, 2)
    net(torch.randn(5, 3)).sum().backward()
    before = [p.grad.clone() for p in net.parameters()]
    GradientAllReduce(net).all_reduce()
    assert all(torch.equal(a, p.grad) for a, p in zip(before, net.parameters()))


def test_multi_gpu_cuda_graphs_config_stack_resolves(volume_dataset, monkeypatch):
    """The documented torchrun config stack builds the graphed trainer with the all-reduce handler and a sharded loader."""
    from monai.bundle import ConfigParser

    from conftest import BUNDLE
    from msa2net.cuda_graphs import GraphedForward
    from msa2net.data.gpu_loader import GPUSliceLoader

    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        files = ["train.json", "profile_synthetic.json", "adamw.json", "multi_gpu_train.json", "gpu_train.json", "multi_gpu_cuda_graphs.json"]
        parser = ConfigParser()
        parser.read_config([str(BUNDLE / "configs" / f) for f in files])
        parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(volume_dataset), "device": "$torch.device('cpu')", "num_workers": 0})
        parser.parse()
        trainer = parser.get_parsed_content("train#trainer")
        assert isinstance(trainer.network, GraphedForward) and trainer.network.enabled
        assert trainer.network.module is parser.get_parsed_content("network")  # plain module, not DDP
        handlers = parser.get_parsed_content("train#trainer#train_handlers")
        assert isinstance(handlers[0], GradientAllReduce) and handlers[0].network is trainer.network.module
        loader = parser.get_parsed_content("train#dataloader")
        assert isinstance(loader, GPUSliceLoader) and (loader.rank, loader.world_size) == (0, 1)
        assert type(trainer.optimizer).__name__ == "AdamW"
    finally:
        dist.destroy_process_group()
