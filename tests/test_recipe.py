"""The training recipe's parts: per-iteration learning rate, time budget, gradient clipping, EMA, flip TTA, augmentation."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.handlers import ValidationHandler

from msa2net import schedule
from msa2net.data.augment import RandSliceAugmentd, SliceAugmentation
from msa2net.schedule import IterationLR, TimeBudget, lr_factor
from msa2net.step_handlers import EMAUpdate, GradientClipping, NoLossScalingForBF16, model_ema
from msa2net.tta import FlipTTAInferer

BUNDLE_AUG = json.loads((Path(__file__).resolve().parents[1] / "bundle" / "configs" / "train.json").read_text())["augmentation_params"]


def test_lr_factor_warms_up_then_decays_to_zero():
    assert lr_factor(0, 100, warmup_iters=10) == pytest.approx(0.1)
    assert lr_factor(9, 100, warmup_iters=10) == pytest.approx(1.0)
    assert lr_factor(10, 100, warmup_iters=10) == pytest.approx(1.0)
    assert lr_factor(100, 100, "poly", 10) == 0.0 and lr_factor(100, 100, "cosine", 10) == pytest.approx(0.0)
    assert lr_factor(55, 100, "cosine", 10) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(50, 100, "step")


class Clock:
    """The time :class:`TimeBudget` reads: advanced only by ``tick``, so runs neither spend nor measure wall-clock time."""

    def __init__(self) -> None:
        self.now = 0.0

    def tick(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(schedule, "time", SimpleNamespace(perf_counter=lambda: fake.now))
    return fake


def validations(validator: Engine) -> list[int]:
    """The epochs a validator runs on, recorded by a handler on the validator itself."""
    epochs = []
    validator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epochs.append(e.state.epoch))
    return epochs


def one_batch_evaluator() -> SupervisedEvaluator:
    """A real MONAI evaluator (one batch, a 1x1 convolution), run by the handlers as ``run(global_epoch)``."""
    batch = {"image": torch.zeros(1, 1, 4, 4), "label": torch.zeros(1, 1, 4, 4)}
    return SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=[batch], epoch_length=1, network=torch.nn.Conv2d(1, 1, 1))


def test_time_budget_fits_the_run_and_the_schedule_ends_with_it(clock):
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.1)
    lrs = []

    def step(engine, batch):
        clock.tick(1 / 64)  # 4 iterations per epoch: 1/16 s, binary-exact
        lrs.append(opt.param_groups[0]["lr"])

    engine = Engine(step)
    validator = one_batch_evaluator()
    validated = validations(validator)
    IterationLR(opt, "poly", warmup_iters=2).attach(engine)
    ValidationHandler(interval=10, validator=validator).attach(engine)  # as train.json validates
    TimeBudget(1.5, validator=validator).attach(engine)
    engine.run(range(4), max_epochs=10_000)
    # 1.5 s at 1/16 s per epoch: 24 epochs (the first is warm-up, the second gives the speed), not 10,000
    assert engine.state.epoch == engine.state.max_epochs == 24 and clock.now == 1.5
    assert lrs[0] == pytest.approx(0.05) and max(lrs) == pytest.approx(0.1)
    # from the third epoch on, the schedule is that of a 96-iteration run: not cut off, it ends near zero
    assert lrs[8:] == pytest.approx([0.1 * lr_factor(i, 96, "poly", 2) for i in range(8, 96)])
    assert lrs[-1] < 0.002
    assert opt.param_groups[0]["initial_lr"] == 0.1
    assert validated == [10, 20, 24]  # the last epoch is validated too
    unlimited = Engine(lambda e, b: None)
    TimeBudget(None).attach(unlimited)
    assert unlimited.run([1], max_epochs=3).epoch == 3


def test_time_budget_does_not_validate_the_last_epoch_twice(clock):
    engine = Engine(lambda e, b: clock.tick(1 / 64))
    validator = one_batch_evaluator()
    validated = validations(validator)
    ValidationHandler(interval=12, validator=validator).attach(engine)
    TimeBudget(1.5, validator=validator).attach(engine)
    engine.run(range(4), max_epochs=10_000)
    assert engine.state.epoch == 24 and validated == [12, 24]


def test_gradient_clipping_bounds_the_global_norm():
    net = torch.nn.Linear(8, 8)
    for p in net.parameters():
        p.grad = torch.full_like(p, 100.0)
    GradientClipping(net, max_norm=2.0)(SimpleNamespace(amp=False, scaler=None, optimizer=None))
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters()]))
    assert norm == pytest.approx(2.0, rel=1e-4)
    with pytest.raises(ValueError):
        GradientClipping(net, max_norm=0)


def test_gradient_clipping_equals_torchs_clip_grad_norm():
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(6, 2)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(2, 1, 8, 8)
    for net in nets:
        net(x).pow(2).sum().mul(50).backward()
    GradientClipping(nets[0], max_norm=0.5)(SimpleNamespace(amp=False, scaler=None, optimizer=None))
    torch.nn.utils.clip_grad_norm_(nets[1].parameters(), 0.5)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_ema_follows_the_weights_slowly():
    net = torch.nn.Linear(2, 2)
    ema = model_ema(net, decay=0.9)
    updater = EMAUpdate(ema, net)
    with torch.no_grad():
        net.weight.add_(1.0)
    updater(SimpleNamespace(state=SimpleNamespace(iteration=1)))  # decay warm-up: the first update copies
    assert torch.allclose(ema.module.weight, net.weight)
    with torch.no_grad():
        net.weight.add_(1.0)
    updater(SimpleNamespace(state=SimpleNamespace(iteration=1000)))  # warmed up: decay 0.9
    assert torch.allclose(ema.module.weight, net.weight - 0.9)
    with pytest.raises(ValueError):
        model_ema(net, decay=1.0)


def test_ema_update_equals_timms_own_update_with_buffers():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    ours, timms = model_ema(net, decay=0.99), model_ema(net, decay=0.99)
    updater = EMAUpdate(ours, net)
    for step in (1, 5, 50):
        net.train()(torch.randn(2, 1, 8, 8))  # moves the BatchNorm statistics and num_batches_tracked
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        updater(SimpleNamespace(state=SimpleNamespace(iteration=step)))
        timms.update(net, step=step)
    for (name, a), b in zip(ours.module.state_dict().items(), timms.module.state_dict().values()):
        assert torch.equal(a, b), name


# MONAI's trainer autocasts to "cuda" and makes a CUDA GradScaler whatever the device: without a GPU both
# warn and switch themselves off, so on a CPU the step runs in float32 and only the handler's choice of
# scaler is observable; on a GPU the float16 scaler is a live one and the prediction is in the amp dtype.
@pytest.mark.filterwarnings("ignore:.*CUDA is not available:UserWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_bf16_trainer_runs_without_loss_scaling_and_fp16_keeps_it(dtype):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 2, 3, padding=1).to(device)
    before = [p.detach().clone() for p in net.parameters()]
    batch = {"image": torch.randn(2, 1, 8, 8), "label": torch.randn(2, 2, 8, 8)}
    trainer = SupervisedTrainer(
        device=device, max_epochs=1, train_data_loader=[batch, batch], epoch_length=2, network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=lambda p, y: (p.float() - y).pow(2).mean(),
        amp=True, amp_kwargs={"dtype": dtype},
    )
    made, used = [], []
    trainer.add_event_handler(Events.STARTED, lambda e: made.append(e.scaler))  # registered first: Trainer.run's own scaler
    NoLossScalingForBF16().attach(trainer)
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, lambda e: used.append(e.scaler))
    trainer.run()
    assert trainer.state.iteration == 2 and len(used) == 2 and made[0] is not None
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters())), "the optimiser did not step"
    if dtype == torch.bfloat16:
        assert all(s is not made[0] and not s.is_enabled() for s in used)
    else:
        assert all(s is made[0] for s in used)
        assert made[0].is_enabled() == torch.cuda.is_available()
    if device.type == "cuda":
        assert trainer.state.output[0]["pred"].dtype == dtype


def test_flip_tta_averages_probabilities_of_flipped_passes():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 3, 3, padding=1)  # not flip-equivariant
    x = torch.randn(2, 1, 16, 16)

    def plain(inputs, network):
        return network(inputs)

    out = FlipTTAInferer(plain, [[2], [3]])(x, net)
    expected = (net(x).softmax(1) + net(x.flip(2)).softmax(1).flip(2) + net(x.flip(3)).softmax(1).flip(3)) / 3
    assert torch.allclose(out.softmax(1), expected, atol=1e-5)
    assert torch.equal(FlipTTAInferer(plain, [])(x, net), net(x))
    with pytest.raises(ValueError, match="spatial dims"):
        FlipTTAInferer(plain, [[1]])


def blobs(n=6, size=48):
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    img = torch.stack([torch.exp(-(((yy - 15 - 3 * i) / 8) ** 2 + ((xx - 20 - 2 * i) / 6) ** 2)) for i in range(n)])[:, None]
    return img, (img > 0.5).to(torch.uint8) + (img > 0.8).to(torch.uint8)


def test_spatial_augmentation_moves_image_and_label_together():
    img, lbl = blobs()
    aug = SliceAugmentation(rotate_prob=1.0, scale_prob=1.0, flip_prob=0.5)
    out_img, out_lbl = aug(img, lbl, torch.Generator().manual_seed(1))
    assert out_lbl.dtype == torch.uint8 and set(out_lbl.unique().tolist()) <= {0, 1, 2}
    ref = (out_img > 0.5).to(torch.uint8) + (out_img > 0.8).to(torch.uint8)
    assert (out_lbl != ref).float().mean() < 0.02  # bilinear vs nearest differ only at boundaries
    assert not torch.equal(out_lbl, lbl)


def test_intensity_augmentation_leaves_labels_and_respects_zero_probabilities():
    img, lbl = blobs()
    g = torch.Generator().manual_seed(2)
    out_img, out_lbl = SliceAugmentation(**BUNDLE_AUG)(img.clone(), lbl.clone(), g)
    assert out_img.shape == img.shape and torch.isfinite(out_img).all()
    none_img, none_lbl = SliceAugmentation()(img.clone(), lbl.clone(), g)
    assert torch.equal(none_img, img) and torch.equal(none_lbl, lbl)
    every = {k: (1.0 if k.endswith("_prob") and k not in ("rot90_prob", "flip_prob", "rotate_prob", "scale_prob") else v)
             for k, v in BUNDLE_AUG.items() if not k.startswith(("rotate", "scale", "flip"))}
    changed, same_lbl = SliceAugmentation(**every)(img.clone(), lbl.clone(), g)
    assert torch.equal(same_lbl, lbl) and not torch.allclose(changed, img)


def test_augmentation_arguments_are_validated():
    with pytest.raises(ValueError, match="gamma_prob"):
        SliceAugmentation(gamma_prob=1.5)
    with pytest.raises(ValueError, match="scale_range"):
        SliceAugmentation(scale_range=(1.4, 0.7))
    with pytest.raises(ValueError, match="square"):
        SliceAugmentation(rot90_prob=1.0)(torch.rand(1, 1, 8, 12), None)


def test_dictionary_form_is_seeded_and_keeps_types():
    img, lbl = blobs(1)
    t1 = RandSliceAugmentd(["image", "label"], BUNDLE_AUG).set_random_state(5)
    t2 = RandSliceAugmentd(["image", "label"], BUNDLE_AUG).set_random_state(5)
    a, b = t1({"image": img[0], "label": lbl[0]}), t2({"image": img[0], "label": lbl[0]})
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert a["image"].shape == img[0].shape and a["label"].dtype == torch.uint8
    assert "label" not in t1({"image": img[0]})  # inference-style data without a label
