"""The controller's minibatch steps (bnao/controller/steps.py): the same updates as a plain minibatch loop,
bit for bit on the CPU; when graphs are captured and why not; a captured fit on CUDA against an uncaptured one."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnao.controller import NAOController
from bnao.controller.steps import graph_blocker, make_adam, minibatch_sizes, replays_any, set_capturable
from bnao.space import NAOSpace

pytestmark = pytest.mark.usefixtures("one_thread")

SPACE = NAOSpace(5, "small")


class PlainLoop(NAOController):
    """The minibatch loop written out plainly (slices of the shuffled epoch, sums added per minibatch), as the
    controller ran before its steps read device buffers: the reference for :class:`EpochSteps`."""

    def _train_epochs(self, steps, x_train, y_train, epochs, copies, expand_redraw, progress):
        trade_off, grad_clip, batch_size = steps.trade_off, steps.grad_clip, len(steps.offsets)
        params = list(self.model.parameters())
        last = {}
        self.model.train()
        y_all = y_train.repeat(copies + 1)
        x_all = None
        for epoch in range(1, epochs + 1):
            if x_all is None or expand_redraw:
                x_all = torch.cat([x_train] + [self._swap_branches(x_train) for _ in range(copies)])
            perm = self._randperm(x_all.shape[0])
            x, y = x_all[perm], y_all[perm]
            sums = [torch.zeros(()), torch.zeros(()), torch.zeros(())]
            for start in range(0, x.shape[0], batch_size):
                xb, yb = x[start : start + batch_size], y[start : start + batch_size]
                out, emb = self.model.encoder(xb, self.generator)
                pred = self.model.predictor(emb, self.generator)
                log_probs = self.model.decoder(xb, emb, out, self.generator)
                mse = F.mse_loss(pred, yb)
                nll = F.nll_loss(log_probs.reshape(-1, log_probs.shape[-1]), xb.reshape(-1))
                loss = trade_off * mse + (1.0 - trade_off) * nll
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(params, grad_clip)
                self.optimizer.step()
                sums = [total + value.detach() * xb.shape[0] for total, value in zip(sums, (loss, mse, nll))]
            means = torch.stack(sums).numpy() / x.shape[0]
            last = {"loss": float(means[0]), "mse": float(means[1]), "nll": float(means[2])}
        self.model.eval()
        return last


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_steps_equal_a_plain_minibatch_loop_bit_for_bit(dropout):
    """Epochs of 2 x 45 rows in batches of 20 (a short last batch of 10), swap copies redrawn each epoch; with
    dropout the masks come from the same generator in the same order."""
    archs = SPACE.sample_array(50, 4)
    scores = np.random.default_rng(4).random(50)
    kwargs = dict(epochs=3, batch_size=20, lr=5e-3, holdout=0.1, expand=2, expand_redraw=True)
    ours = NAOController(SPACE, seed=7, dropout=dropout)
    plain = PlainLoop(SPACE, seed=7, dropout=dropout)
    got, want = ours.fit(archs, scores, **kwargs), plain.fit(archs, scores, **kwargs)
    for name, value in plain.model.state_dict().items():
        assert torch.equal(ours.model.state_dict()[name], value), name
    assert {k: got[k] for k in ("loss", "mse", "nll", "pairwise_accuracy")} == \
           {k: want[k] for k in ("loss", "mse", "nll", "pairwise_accuracy")}
    assert got["graph"] == {"mode": "uncaptured", "reason": "CPU"}


def test_graph_blocker_names_the_reason():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert graph_blocker("off", cuda, 0.0) == "graph='off'"
    assert graph_blocker("auto", cpu, 0.0) == "CPU"
    assert "dropout" in graph_blocker("auto", cuda, 0.1)
    assert graph_blocker("auto", cuda, 0.0) in (None, "PYTORCH_NO_CUDA_MEMORY_CACHING is set (capture needs the "
                                                       "caching allocator)")
    with pytest.raises(ValueError, match="controller graph='on'.*CPU"):
        graph_blocker("on", cpu, 0.0)
    with pytest.raises(ValueError, match="graph must be one of"):
        graph_blocker("yes", cpu, 0.0)
    archs = SPACE.sample_array(10, 0)
    with pytest.raises(ValueError, match="controller graph='on'"):
        NAOController(SPACE).fit(archs, np.arange(10.0), epochs=1, graph="on")


def test_minibatch_sizes_and_when_a_graph_would_replay():
    assert minibatch_sizes(250, 100) == [100, 100, 50] and minibatch_sizes(200, 100) == [100, 100]
    assert minibatch_sizes(30, 100) == [30]
    assert replays_any(250, 100, 1)  # the second full minibatch replays
    assert not replays_any(150, 100, 1)  # one full, one short: each size runs once
    assert replays_any(150, 100, 2) and replays_any(30, 100, 2) and not replays_any(30, 100, 1)
    archs = SPACE.sample_array(10, 0)
    result = NAOController(SPACE).fit(archs, np.arange(10.0), epochs=1, graph="off")
    assert result["graph"] == {"mode": "uncaptured", "reason": "graph='off'"}


def test_set_capturable_moves_the_step_counts(device):
    """A continued Adam switched to the captured form keeps its moments and counts (float32 steps, on the
    parameters' device), and back (counts on the CPU, where Adam keeps them otherwise)."""
    layer = nn.Linear(3, 2).to(device)
    optimizer = make_adam(layer.parameters(), 1e-3, 0.0, capturable=False)
    layer(torch.ones(1, 3, device=device)).sum().backward()
    optimizer.step()
    optimizer.step()
    moments = [optimizer.state[p]["exp_avg"].clone() for p in layer.parameters()]
    set_capturable(optimizer, True)
    assert all(g["capturable"] and g["foreach"] for g in optimizer.param_groups)
    for param, moment in zip(layer.parameters(), moments):
        step = optimizer.state[param]["step"]
        assert step.dtype == torch.float32 and float(step) == 2.0 and step.device == param.device
        assert torch.equal(optimizer.state[param]["exp_avg"], moment)
    set_capturable(optimizer, False)
    assert not any(g["capturable"] or g["foreach"] for g in optimizer.param_groups)
    assert all(optimizer.state[p]["step"].device.type == "cpu" for p in layer.parameters())


@pytest.mark.cuda
def test_captured_fit_on_cuda_matches_the_uncaptured_one():
    """Graph replays run the minibatches of graph='off' (capturable Adam: the same update up to float rounding);
    both controllers then predict alike, and the captured one says it replayed graphs."""
    archs = SPACE.sample_array(120, 5)
    scores = np.random.default_rng(5).random(120)
    kwargs = dict(epochs=4, batch_size=25, lr=1e-3, holdout=0.1, expand=2)
    captured, uncaptured = NAOController(SPACE, device="cuda", seed=1), NAOController(SPACE, device="cuda", seed=1)
    got = captured.fit(archs, scores, graph="auto", **kwargs)
    want = uncaptured.fit(archs, scores, graph="off", **kwargs)
    assert got["graph"] == {"mode": "graph", "reason": "captured"}, got["graph"]
    assert want["graph"] == {"mode": "uncaptured", "reason": "graph='off'"}
    for name, value in uncaptured.model.state_dict().items():
        torch.testing.assert_close(captured.model.state_dict()[name], value, atol=1e-5, rtol=1e-4, msg=name)
    assert abs(got["loss"] - want["loss"]) < 1e-4
    np.testing.assert_allclose(captured.predict(archs), uncaptured.predict(archs), atol=1e-5)
    # A second fit continues on fresh graphs (a new Adam, reset_optimizer=True) and stays finite.
    assert np.isfinite(captured.fit(archs, scores, **kwargs)["loss"])


@pytest.mark.cuda
def test_continued_and_restored_adam_replay_on_cuda():
    """reset_optimizer=False continues an uncaptured Adam in captured minibatches (its counts moved to the GPU),
    and a controller restored from a state dict fits with graphs too; both match graph='off' closely."""
    archs = SPACE.sample_array(120, 6)
    scores = np.random.default_rng(6).random(120)
    kwargs = dict(epochs=3, batch_size=25, holdout=0.1, expand=2)
    results = {}
    for graph in ("auto", "off"):
        ctrl = NAOController(SPACE, device="cuda", seed=2)
        ctrl.fit(archs, scores, graph="off", **kwargs)
        first = ctrl.fit(archs, scores, graph=graph, reset_optimizer=False, **kwargs)
        restored = NAOController(SPACE, device="cuda", seed=9)
        restored.load_state_dict(ctrl.state_dict())
        second = restored.fit(archs, scores, graph=graph, reset_optimizer=False, **kwargs)
        results[graph] = (first, second, restored.predict(archs))
    for first, second in [results["auto"][:2]]:
        assert first["graph"]["mode"] == "graph" and second["graph"]["mode"] == "graph"
    assert abs(results["auto"][1]["loss"] - results["off"][1]["loss"]) < 1e-4
    np.testing.assert_allclose(results["auto"][2], results["off"][2], atol=1e-4)
