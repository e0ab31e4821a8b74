"""The inner-loop abstraction: update rules, lr specs, masks, first/second order, in float64."""
import pytest
import torch
import torch.nn.functional as F

from metalearn.inner import Adam, PerElementLR, PerStepLR, SGD, run_inner_loop

from test_maml_gradients import make_batch, make_model


def test_adam_rule_matches_torch_optim_adam():
    """Our functional Adam (beta1 = 0, as Reptile) follows torch.optim.Adam step for step.

    Without BatchNorm: with it, conv biases have gradients of pure round-off (~1e-17), which Adam's
    g / (|g| + eps) amplifies to O(1e-7) differences between two equally valid evaluation orders."""
    model, batch = make_model(batchnorm=False), make_batch()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = list(params)
    ours = run_inner_loop(model, {n: p.clone().requires_grad_() for n, p in params.items()}, batch.support.task(0),
                          adapt=names, steps=4, rule=Adam(1e-2, betas=(0.0, 0.999)), first_order=True)
    theirs = {n: p.clone().requires_grad_() for n, p in params.items()}
    opt = torch.optim.Adam(theirs.values(), lr=1e-2, betas=(0.0, 0.999))
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(torch.func.functional_call(model, theirs, (batch.support.x[0],)), batch.support.y[0]).backward()
        opt.step()
    assert ours.state.t == 4
    for n in names:
        torch.testing.assert_close(ours.params[n], theirs[n], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ours.state.v[n], opt.state[theirs[n]]["exp_avg_sq"], rtol=1e-12, atol=1e-16)


def test_adam_state_is_returned_not_mutated():
    model, batch = make_model(), make_batch()
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    rule = Adam(1e-3)
    state0 = rule.init(params, list(params))
    res = run_inner_loop(model, params, batch.support.task(0), adapt=list(params), steps=2, rule=rule,
                         state=state0, first_order=True)
    assert state0.t == 0 and all(torch.count_nonzero(v) == 0 for v in state0.v.values())
    assert res.state.t == 2


def test_second_order_through_adam_is_differentiable():
    """Adam is written in differentiable tensor ops: d theta_S / d theta_0 exists and is not the identity."""
    model, batch = make_model(), make_batch()
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    res = run_inner_loop(model, params, batch.support.task(0), adapt=["head.weight", "head.bias"], steps=2,
                         rule=Adam(1e-2, betas=(0.5, 0.999)))
    loss = F.cross_entropy(torch.func.functional_call(model, res.params, (batch.query.x[0],)), batch.query.y[0])
    g_so = torch.autograd.grad(loss, params["features.0.conv.weight"])[0]
    assert torch.isfinite(g_so).all() and g_so.abs().max() > 0


def test_per_step_and_per_element_lrs_reduce_to_scalar_sgd():
    model, batch = make_model(), make_batch()
    params = dict(model.named_parameters())
    names = list(params)
    base = run_inner_loop(model, params, batch.support.task(0), adapt=names, steps=2, lr=0.3).params
    step = run_inner_loop(model, params, batch.support.task(0), adapt=names, steps=2,
                          lr=PerStepLR(names, 2, 0.3, dtype=torch.float64)).params
    elem = run_inner_loop(model, params, batch.support.task(0), adapt=names, steps=2,
                          lr=PerElementLR(params, names, 0.3)).params
    for n in names:
        torch.testing.assert_close(step[n], base[n], rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(elem[n], base[n], rtol=1e-13, atol=1e-15)


def test_per_step_lr_uses_each_steps_rate():
    """Step 0 with rate 0 and step 1 with rate a equals one SGD step with rate a."""
    model, batch = make_model(), make_batch()
    params = dict(model.named_parameters())
    lrs = PerStepLR(["head.weight"], 2, 0.0, dtype=torch.float64)
    with torch.no_grad():
        lrs.lrs["head__weight"][1] = 0.5
    two = run_inner_loop(model, params, batch.support.task(1), adapt=["head.weight"], steps=2, lr=lrs).params
    one = run_inner_loop(model, params, batch.support.task(1), adapt=["head.weight"], steps=1, lr=0.5).params
    torch.testing.assert_close(two["head.weight"], one["head.weight"], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("patterns", [["head.*"], ["features.*"], ["features.0.*", "head.bias"]])
def test_mask_leaves_unselected_parameters_bit_identical(patterns):
    from metalearn.inner import select

    model, batch = make_model(), make_batch()
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    adapt = select(params, patterns)
    for rule in (SGD(0.4), Adam(1e-2)):
        fast = run_inner_loop(model, params, batch.support.task(0), adapt=adapt, steps=2, rule=rule).params
        for name in params:
            if name in adapt:
                assert not torch.equal(fast[name], before[name]), name
            else:
                assert fast[name] is params[name] and torch.equal(fast[name], before[name])
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])


def test_first_order_keeps_learnable_lr_in_graph():
    model, batch = make_model(), make_batch()
    params = dict(model.named_parameters())
    alpha = PerElementLR(params, ["head.weight"], 0.1)
    fast = run_inner_loop(model, params, batch.support.task(0), adapt=["head.weight"], steps=2, lr=alpha,
                          first_order=True).params
    loss = F.cross_entropy(torch.func.functional_call(model, fast, (batch.query.x[0],)), batch.query.y[0])
    (g,) = torch.autograd.grad(loss, list(alpha.parameters()))
    assert g.abs().max() > 0


@pytest.mark.parametrize("mask", [["*"], ["features.1.*", "head.*"]], ids=["all", "some"])
@pytest.mark.parametrize("lr_kind", ["scalar", "per-element"])
def test_adapt_over_a_task_dimension_equals_per_task_adapt(lr_kind, mask):
    """adapt(..., tasks=T) over conv4's batched forward (float64, BatchNorm on, SGD, second order) gives
    each task the parameters T separate adapt calls give it, and a downstream loss on them (each task's
    query loss through the ordinary forward) has the same gradient w.r.t. theta and the learned lrs."""
    from metalearn.inner import adapt, forward, select
    from metalearn.inner.batched import batched_forward, batched_loss

    from test_maml_gradients import STEPS, assert_close

    model, batch = make_model(), make_batch()
    params = dict(model.named_parameters())
    names = select(list(params), mask)
    T = batch.num_tasks
    if lr_kind == "scalar":
        lr, learnables = 0.3, []
    else:
        lr = PerElementLR(params, names, 0.3)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # a different rate for every element
            for p in lr.parameters():
                p.mul_(0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))
        learnables = list(lr.parameters())
    one = lambda p, x, s: forward(model, p, x)  # noqa: E731
    many = batched_forward(model)
    together = adapt(lambda p, x, s: many(p, x), params, batch.support.x, batch.support.y, names=names, rule=SGD(lr),
                     steps=STEPS, first_order=False, loss_fn=batched_loss("cross_entropy"), tasks=T).params
    apart = [adapt(one, params, batch.support.x[t], batch.support.y[t], names=names, rule=SGD(lr), steps=STEPS,
                   first_order=False, loss_fn=F.cross_entropy).params for t in range(T)]
    for n, p in params.items():
        if n in names:
            assert together[n].shape == (T, *p.shape), n
            assert_close({n: together[n]}, {n: torch.stack([a[n] for a in apart])}, rtol=1e-12)
        else:  # shared, not copied: its gradient is the sum over tasks, as in the loop
            assert together[n] is p and all(a[n] is p for a in apart), n

    def downstream(task_params) -> dict:
        loss = sum(F.cross_entropy(one(task_params(t), batch.query.x[t], 0), batch.query.y[t]) for t in range(T)) / T
        wrt = list(params.values()) + learnables
        return dict(zip([*params, *(f"lr.{i}" for i in range(len(learnables)))], torch.autograd.grad(loss, wrt)))

    got = downstream(lambda t: {n: (together[n][t] if n in names else p) for n, p in params.items()})
    ref = downstream(lambda t: apart[t])
    assert_close(got, ref)
    # the comparison is second order: the first-order inner loop gives a clearly different gradient
    fo = [adapt(one, params, batch.support.x[t], batch.support.y[t], names=names, rule=SGD(lr), steps=STEPS,
                first_order=True, loss_fn=F.cross_entropy).params for t in range(T)]
    fo = downstream(lambda t: fo[t])
    assert max((fo[k] - ref[k]).abs().max().item() for k in ref) > 1e-3 * max(ref[k].abs().max().item() for k in ref)
