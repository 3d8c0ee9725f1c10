"""Training on a GPU (``device``) and cutting clients into pseudo-users (``data.pseudo_users``).

The GPU test runs only where CUDA is available (not in CI); everything else runs anywhere.
"""

from __future__ import annotations

import json

import pytest
import torch

from privlm.config import load_config
from privlm.data.corpus import ClientData, FederatedCorpus, split_into_pseudo_users
from privlm.errors import ConfigError
from privlm.federated.client import get_params
from privlm.api import Simulation
from privlm.runtime.training import resolve_device

TINY = ["data.source=synthetic-clinic", "data.num_clients=40", "data.scrub.enabled=false",
        "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
        "federation.clients_per_round=10", "client.local_steps=2", "eval.max_clients=10"]


def test_device_is_validated_and_an_absent_gpu_is_an_error():
    with pytest.raises(ConfigError, match=r"device"):
        load_config(None, ["device=gpu"])
    cfg = load_config(None, ["device=cuda:99"])
    with pytest.raises(ConfigError, match=r"^device: 'cuda:99' is not available here"):
        resolve_device(cfg)
    assert resolve_device(load_config(None, ["device=cpu"])) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(load_config(None, ["device=auto"])).type == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_run_matches_the_cpu_run(tmp_path):
    """Same seed: same sampled clients and epsilon each round, parameters equal to float tolerance.

    Local SGD, not Adam: Adam's normalisation turns last-bit differences of near-zero
    gradients (GPU and CPU kernels round differently) into steps of size lr.
    """
    runs = {}
    for device in ("cpu", "cuda"):
        cfg = load_config(None, [*TINY, "federation.rounds=3", "privacy.noise_multiplier=1.0",
                                 "client.optimizer=sgd", "client.lr=0.5",
                                 "privacy.seeded_noise=true", f"device={device}"])
        sim = Simulation(cfg)
        assert sim.device.type == device
        runs[device] = sim.run(tmp_path / device, progress=False)
        # The server's state lives on the host whatever trains.
        assert all(t.device.type == "cpu" for t in get_params(sim.model).values())
    cpu, gpu = runs["cpu"], runs["cuda"]
    assert [m["sampled"] for m in cpu.metrics] == [m["sampled"] for m in gpu.metrics]
    assert [m["epsilon"] for m in cpu.metrics] == [m["epsilon"] for m in gpu.metrics]
    assert gpu.eval_loss == pytest.approx(cpu.eval_loss, rel=1e-4)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "cpu" / "checkpoints" / "round-0003.safetensors"))
    b = load_file(str(tmp_path / "cuda" / "checkpoints" / "round-0003.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def _corpus() -> FederatedCorpus:
    lines = [f"line {i}" for i in range(10)]
    return FederatedCorpus("t", (
        ClientData("play/A", "\n".join(lines), "held 1\nheld 2\nheld 3"),
        ClientData("play/B", "only\ntwo", ""),
    ))


def test_pseudo_users_keep_every_line_in_order_and_make_none_empty():
    split = split_into_pseudo_users(_corpus(), 4)
    ids = [c.client_id for c in split.clients]
    assert ids == ["play/A#0", "play/A#1", "play/A#2", "play/A#3", "play/B#0", "play/B#1"]
    a = [c for c in split.clients if c.client_id.startswith("play/A")]
    assert "\n".join(c.train for c in a) == _corpus().clients[0].train
    assert [c.train.count("\n") + 1 for c in a] == [2, 3, 2, 3]
    assert "\n".join(c.test for c in a if c.test) == "held 1\nheld 2\nheld 3"
    assert all(c.train for c in split.clients)
    assert split.info["real_clients"] == 2 and split.info["pseudo_users_per_client"] == 4


def test_a_pseudo_user_run_says_what_it_protects(tmp_path):
    cfg = load_config(None, [*TINY, "data.pseudo_users=3", "federation.rounds=1",
                             "privacy.noise_multiplier=1.0"])
    sim = Simulation(cfg)
    assert sim.corpus.num_clients > 40  # 40 patients, most with several lines
    res = sim.run(tmp_path / "run", progress=False)
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert privacy["unit"] == "pseudo-user" and privacy["pseudo_users_per_client"] == 3
    assert privacy["num_clients"] == sim.corpus.num_clients
    assert privacy["sampling_rate"] == pytest.approx(10 / sim.corpus.num_clients)
    assert "PSEUDO-USER" in privacy["guarantee"] and "40 clients" in privacy["population"]
    assert res.rounds_completed == 1


def test_pseudo_users_do_not_mix_with_silos_or_an_audit():
    with pytest.raises(ConfigError, match=r"data: set data.silos or data.pseudo_users, not both"):
        load_config(None, ["data.silos=2", "data.pseudo_users=2"])
    with pytest.raises(ConfigError, match=r"^data.pseudo_users: an audit plants canaries per client"):
        Simulation(load_config(None, [*TINY, "data.pseudo_users=2", "audit.canaries=4"]))
