"""prune --out-norm-init fit: each replacement's output norms are the per-feature least-squares fit."""

import torch
import torch.nn.functional as F

from prunext.prune import methods
from prunext.prune.fitnorm import Moments, fit_out_norms
from prunext.prune.importance import BlockScores
from prunext.prune.ratio import ModelSizes, plan_budget

BI = [0.9, 0.1, 0.5, 0.3, 0.2, 0.8]  # blocks 1 and 4 pruned at ratio 0.25


def _pruned(hf, out_norm_init=0.01):
    sizes = ModelSizes.from_model(hf)
    budget = plan_budget("flexigpt", sizes, 0.25, adapter_rank=2)
    weights = methods.block_weights(hf, range(sizes.num_blocks))
    pruning = methods.decide(BlockScores("bi", 1, list(BI), 1000), budget, weights, filter_rank=2)
    torch.manual_seed(0)
    model = methods.build_model(hf, pruning, out_norm_init)
    methods.init_adapters_svd(model, pruning, weights)
    return model.eval(), pruning


def _windows(n=6, seq=16):
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(1))


def test_moments_solve_is_least_squares_per_feature():
    g = torch.Generator().manual_seed(0)
    x, o = torch.randn(200, 3, generator=g), torch.randn(200, 3, generator=g)
    moments = Moments(3)
    moments.add(x[:120], o[:120])
    moments.add(x[120:], o[120:])
    gamma, beta = moments.solve()
    for d in range(3):
        design = torch.stack([x[:, d], torch.ones(200)], 1).double()
        coef = torch.linalg.lstsq(design, o[:, d : d + 1].double()).solution.flatten()
        torch.testing.assert_close(torch.stack([gamma[d], beta[d]]), coef, rtol=1e-9, atol=1e-9)


def test_fitted_attention_norm_equals_a_hand_least_squares_fit(tiny_hf):
    hf = tiny_hf("llama", layers=6)
    model, pruning = _pruned(hf)
    windows = _windows()
    fit_out_norms(model, hf, pruning.sources, windows, batch_size=4, device="cpu", progress=False)
    first = min(pruning.sources)  # nothing upstream of its attention branch was refitted
    captured = {}

    def grab(name):
        def hook(module, args, kwargs, output):
            captured[name] = output[0]
            if name == "replacement":
                captured["original"] = hf.model.layers[first].self_attn(*args, **kwargs)[0]

        return hook

    handle = model.model.layers[first].self_attn.register_forward_hook(grab("replacement"), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    handle.remove()
    norm = model.model.layers[first].attn_out_norm
    x = F.layer_norm(captured["replacement"], (x_dim := captured["replacement"].shape[-1],), eps=norm.eps).reshape(-1, x_dim)
    o = captured["original"].reshape(-1, x_dim)
    for d in range(x_dim):
        design = torch.stack([x[:, d], torch.ones(x.shape[0])], 1).double()
        gamma, beta = torch.linalg.lstsq(design, o[:, d : d + 1].double()).solution.flatten()
        torch.testing.assert_close(norm.weight[d].double(), gamma, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(norm.bias[d].double(), beta, rtol=1e-4, atol=1e-6)
    # the fitted branch is no farther from the original than dropping it (gamma = beta = 0)
    fitted = x * norm.weight.detach() + norm.bias.detach()
    assert (fitted - o).pow(2).mean() <= o.pow(2).mean()


def test_fit_starts_closer_to_the_dense_model_than_the_small_scale(tiny_hf):
    hf = tiny_hf("llama", layers=6)
    windows = _windows()
    with torch.no_grad():
        dense = hf(input_ids=windows).logits
        small, pruning = _pruned(hf, out_norm_init=0.01)
        gap_small = (small(input_ids=windows).logits - dense).pow(2).mean()
        fitted, _ = _pruned(hf, out_norm_init=0.01)
    fit_out_norms(fitted, hf, pruning.sources, windows, batch_size=4, device="cpu", progress=False)
    with torch.no_grad():
        gap_fit = (fitted(input_ids=windows).logits - dense).pow(2).mean()
    assert gap_fit < gap_small, (gap_fit, gap_small)
