"""The two-process pair against the single-device grouped reference, on gloo.

Tolerances (fp32): the pair and the reference compute the same sums, but the
reference's grouped convolutions may be evaluated by other kernels in another
order, so results agree to rounding, not bit for bit:
logits and gradients rtol=1e-4, atol=1e-5; weights after 5 SGD steps rtol=1e-4,
atol=1e-6 (weights start at ~1e-1 scale and move by ~lr * grad).

Each spawned pair runs every VARIANT of the column (the dist.* speed options),
and every variant must reproduce the reference: the overlapped crossings sum
the same terms in another order, so the same tolerances hold.
"""
import time

import pytest
import torch
import torch.nn.functional as F

from alexnet_mp.config import build_config
from alexnet_mp.distributed import setup
from alexnet_mp.summary import analytic_bytes
from alexnet_mp.trainer.optim import param_groups
from alexnet_mp.transport import PeerError, PeerLink
from alexnet_mp.weights import build_column, build_reference, dropout_generator, merge_states
from harness import SMALL_MODEL, run_ranks

LOGIT_TOL = dict(rtol=1e-4, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)
WEIGHT_TOL = dict(rtol=1e-4, atol=1e-6)
BATCH, STEPS = 6, 5
# build_column's speed options; none may change the results.
VARIANTS = {
    "plain": {},
    "overlap": {"overlap": True},
    "channels_last": {"channels_last": True},
    "overlap_channels_last": {"overlap": True, "channels_last": True},
}
# bf16 autocast changes the rounding, not the function: a loose check, plus the bytes.
AMP_TOL = dict(rtol=5e-2, atol=5e-2)


def small_cfg(*extra):
    return build_config(overrides=[*SMALL_MODEL, "dist.device=cpu", "dist.threads=1",
                                   "train.lr=0.05", *extra])


def batch_for(cfg, step):
    g = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(BATCH, 3, cfg.model.crop_size, cfg.model.crop_size, generator=g)
    return images, torch.randint(0, cfg.model.num_classes, (BATCH,), generator=g)


def train_sequence(model, cfg):
    """Identical on the pair and on the reference: logits, gradients, then SGD steps."""
    model.set_dropout_generator(dropout_generator(cfg.train.seed, "cpu"))
    opt = torch.optim.SGD(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                          momentum=cfg.train.momentum)
    out = {}
    for step in range(STEPS):
        images, labels = batch_for(cfg, step)
        model.train()
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            out["logits"] = logits.detach().clone()
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.eval()
            with torch.no_grad():
                out["eval_logits"] = model(images)
        opt.step()
    out["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
    return out


class _Forgotten:
    def __init__(self, pending):
        self.pending = pending

    def wait(self):
        return torch.zeros_like(self.pending.wait())


class ForgetfulLink(PeerLink):
    """A deliberately broken crossing: backward exchanges as usual, then forgets the peer's share."""

    def start(self, send, recv_shape, like, crossing, phase):
        pending = super().start(send, recv_shape, like, crossing, phase)
        return _Forgotten(pending) if phase == "backward" and recv_shape is not None else pending


def one_step_bytes(model, cfg, link):
    """One training step's traffic, for the byte count."""
    link.stats.reset()
    images, labels = batch_for(cfg, 0)
    logits = model(images)
    F.cross_entropy(logits, labels).backward()
    return logits.detach(), {k: {"sent": v["sent"], "recv": v["recv"]} for k, v in link.stats.as_dict().items()}


def pair_worker(rank, overrides, variants, broken_backward=False):
    cfg = small_cfg(*overrides)
    layout = setup(cfg.dist)
    results = {}
    for name in variants:
        # A fresh link: channels_last sets its wire layout.
        link = (ForgetfulLink(layout.column, layout.peer_rank, layout.mp_group, 60) if broken_backward
                else layout.link(timeout_s=60))
        model = build_column(cfg.model, layout.column, link, cfg.train.seed, **VARIANTS[name])
        _, bytes_one_step = one_step_bytes(model, cfg, link)
        model = build_column(cfg.model, layout.column, link, cfg.train.seed, **VARIANTS[name])
        results[name] = dict(train_sequence(model, cfg), bytes=bytes_one_step)
    if not broken_backward:
        for overlap in (False, True):
            link = layout.link(timeout_s=60)
            model = build_column(cfg.model, layout.column, link, cfg.train.seed, overlap=overlap, amp="bf16")
            model.set_dropout_generator(dropout_generator(cfg.train.seed, "cpu"))  # the reference's masks
            logits, bytes_one_step = one_step_bytes(model, cfg, link)
            results[f"amp_overlap={overlap}"] = {"logits": logits, "bytes": bytes_one_step,
                                                 "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    return results


def run_pair_and_reference(overrides, variants=tuple(VARIANTS), broken_backward=False):
    results = run_ranks(pair_worker, args=(overrides, variants, broken_backward), timeout=120)
    cfg = small_cfg(*overrides)
    ref = train_sequence(build_reference(cfg.model, cfg.train.seed), cfg)
    return cfg, results, ref


# The paper's switches (activation, pooling, LRN, dropout) must keep the pair equal to the reference too.
SWITCHES = ["model.activation=tanh", "model.pool=plain", "model.lrn.enabled=false", "model.dropout=0.2"]


@pytest.fixture(scope="module", params=["split", "rank0", "switches"])
def pair_run(request):
    overrides = SWITCHES if request.param == "switches" else [f"model.fc8={request.param}"]
    return run_pair_and_reference(overrides)


def analytic(cfg, rank, element_size=4):
    """The model's crossings (the input swap is the trainer's, not the model's)."""
    return {k: v for k, v in analytic_bytes(cfg.model, BATCH, rank, element_size).items()
            if (v["sent"] or v["recv"]) and k != "input.forward"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_reference(pair_run, variant):
    _, results, ref = pair_run
    for rank in (0, 1):  # both columns hold the full logits
        torch.testing.assert_close(results[rank][variant]["logits"], ref["logits"], **LOGIT_TOL)
        torch.testing.assert_close(results[rank][variant]["eval_logits"], ref["eval_logits"], **LOGIT_TOL)
    # Dropout was on and did drop units: train and eval logits differ.
    assert not torch.allclose(ref["logits"], ref["eval_logits"], **LOGIT_TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_match_reference(pair_run, variant):
    cfg, results, ref = pair_run
    grads = merge_states([results[0][variant]["grads"], results[1][variant]["grads"]], cfg.model)
    assert grads.keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], g, **GRAD_TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_weights_match_after_sgd_steps(pair_run, variant):
    cfg, results, ref = pair_run
    weights = merge_states([results[0][variant]["weights"], results[1][variant]["weights"]], cfg.model)
    start = build_reference(cfg.model, cfg.train.seed).state_dict()
    for name, w in ref["weights"].items():
        assert not torch.equal(w, start[name]), f"{name} did not move"
        torch.testing.assert_close(weights[name], w, **WEIGHT_TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_bytes_per_step_equal_analytic_count(pair_run, variant):
    cfg, results, _ = pair_run
    for rank in (0, 1):
        assert results[rank][variant]["bytes"] == analytic(cfg, rank)


@pytest.mark.parametrize("overlap", [False, True])
def test_bf16_autocast_halves_the_bytes_and_keeps_the_logits(pair_run, overlap):
    cfg, results, ref = pair_run
    for rank in (0, 1):
        amp = results[rank][f"amp_overlap={overlap}"]
        assert amp["bytes"] == analytic(cfg, rank, element_size=2)
        assert amp["logits"].dtype == torch.float32  # the loss is taken in fp32
        torch.testing.assert_close(amp["logits"], ref["logits"], **AMP_TOL)
        assert not torch.equal(amp["logits"], results[rank]["plain"]["logits"])  # bf16 did round
    # The overlapped bf16 backward (its own Function) against autocast's, on the same bf16 forward.
    grads, autocast_grads = (merge_states([results[rank][f"amp_overlap={o}"]["grads"] for rank in (0, 1)], cfg.model)
                             for o in (overlap, False))
    for name, g in autocast_grads.items():
        assert grads[name].dtype == torch.float32  # fp32 gradients for the fp32 weights
        torch.testing.assert_close(grads[name], g, **AMP_TOL, msg=lambda m: f"{name}: {m}")


def test_gradient_check_has_teeth():
    """With the peer's gradient dropped at every crossing, the comparison must fail."""
    cfg, results, ref = run_pair_and_reference(["model.fc8=split"], ["plain"], broken_backward=True)
    grads = merge_states([results[0]["plain"]["grads"], results[1]["plain"]["grads"]], cfg.model)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(grads["conv1.weight"], ref["grads"]["conv1.weight"], **GRAD_TOL)
    # Layers after the last crossing see no exchange in backward and still agree.
    torch.testing.assert_close(grads["fc8.weight"], ref["grads"]["fc8.weight"], **GRAD_TOL)


def lost_peer_worker(rank, how, timeout_s, overlap):
    cfg = small_cfg()
    layout = setup(cfg.dist)
    link = layout.link(timeout_s=timeout_s)
    model = build_column(cfg.model, layout.column, link, cfg.train.seed, overlap=overlap)
    if rank == 1:
        if how == "dead":
            import os
            os._exit(1)
        time.sleep(600)  # hung: alive, connected, silent
    try:
        model(batch_for(cfg, 0)[0])
    except PeerError as e:
        return str(e)
    return None


@pytest.mark.parametrize("how,overlap", [("dead", False), ("hung", False), ("dead", True)])
def test_lost_peer_gives_clear_error_within_timeout(how, overlap):
    timeout_s = 3.0
    # No clock in the test: the harness's timeout fails it if rank 0 waits on.
    error = run_ranks(lost_peer_worker, args=(how, timeout_s, overlap), wait_for=[0], timeout=60)[0]
    assert error is not None, "the forward pass should have failed"
    assert "rank 1" in error and "conv3 forward exchange" in error
