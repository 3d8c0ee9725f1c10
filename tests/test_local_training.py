"""The fast paths of a client's local training do what the plain calls do."""

from __future__ import annotations

import torch

from privlm.federated.client import LocalTraining, get_params, local_train, make_optimizer
from privlm.models.transformer import GPT, GPTConfig
from privlm.runtime.training import seed_torch


def test_seed_torch_seeds_the_cpu_generator_like_manual_seed() -> None:
    seed_torch(1234)
    a = torch.rand(8)
    torch.manual_seed(1234)
    b = torch.rand(8)
    seed_torch(99)
    c = torch.rand(8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_local_adam_is_fused_on_the_cpu_and_matches_the_foreach_kernel() -> None:
    cfg = LocalTraining(steps=3, batch_size=2, lr=0.01, optimizer="adam")
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=16))
    opt = make_optimizer(model, cfg)
    assert opt.defaults["fused"] is True
    assert make_optimizer(model, cfg, fused=False).defaults["fused"] is not True  # DP-SGD's (Opacus) path
    params = get_params(model)
    tokens = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(0))

    def run(fused: bool):
        import privlm.federated.client as client

        original = client.make_optimizer
        client.make_optimizer = lambda m, c, fused_=fused: original(m, c, fused=fused_)
        try:
            return local_train(model, params, tokens, cfg, torch.Generator().manual_seed(5)).update
        finally:
            client.make_optimizer = original

    fused, foreach = run(True), run(False)
    assert any(v.abs().max() > 1e-4 for v in fused.values())  # it trained
    for k in fused:
        torch.testing.assert_close(fused[k], foreach[k], rtol=1e-4, atol=5e-5)  # steps of ~lr = 1e-2
