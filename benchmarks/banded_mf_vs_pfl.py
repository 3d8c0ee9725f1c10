"""Banded MF: privlm's Toeplitz strategy and accounting against Apple pfl's BandedMatrixFactorizationMechanism.

pfl (PyPI ``pfl==0.6.0``; needs dp-accounting < 0.6) runs in its own venv, made here on first use at
``benchmarks/out/pflenv`` (CPU torch, then pfl) unless ``--pfl-python`` names an interpreter that has it:

    python benchmarks/banded_mf_vs_pfl.py [--pfl-python /tmp/pflenv/bin/python] [--cases 20x4,40x4,40x8]

For each (T rounds, min-separation b), with z = 1, delta = 1e-5, k = ceil(T/b) participations:

* pfl: its strategy C (``query_matrix``), its epsilon as its own accountant reports it (``PLDPrivacyAccountant``,
  k compositions; q = 1 and q = 0.1 = cohort/population, as pfl's benchmarks pass it) and the time it took;
* pfl's C checked here: column norms, the exact sensitivity under min-separation b (brute force over participation
  patterns for T <= 40, and a dynamic program), the epsilon that sensitivity gives (stock ``dp_accounting``), and an
  upper bound for q = 0.1 with cyclic Poisson sampling: ``Gaussian(z / max column norm)``, k compositions at the
  within-group rate ``b q``;
* privlm: ``optimal_banded_toeplitz`` (b bands), its error, its sensitivity (``sensitivity_squared`` against the same
  explicit-matrix computation) and its epsilon from ``BandedMF``'s per-round events (``epsilon_for``) against stock
  dp_accounting's Gaussian at z / sensitivity.

Error columns: ``||A C^-1||_F^2`` (A = prefix sums) and that times sens^2, the total error at equal noise multiplier
and equal epsilon without sampling (the scale-free comparison). Prints a table; writes ``benchmarks/out/banded_mf_vs_pfl.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dp_accounting
import numpy as np
from dp_accounting import pld

from privlm.mechanisms.banded_mf import BandedMF
from privlm.privacy.accountant import epsilon_for
from privlm.privacy.banded import max_participations, optimal_banded_toeplitz, sensitivity_squared, strategy_matrix, \
    workload_error

OUT = Path(__file__).resolve().parent / "out"
Z, DELTA, Q = 1.0, 1e-5, 0.1

PFL_PROGRAM = r"""
import json, math, sys, time
import numpy as np
from pfl.internal.ops import pytorch_ops
from pfl.internal.ops.selector import set_framework_module
set_framework_module(pytorch_ops)
from pfl.privacy.ftrl_mechanism import BandedMatrixFactorizationMechanism
from pfl.privacy.privacy_accountant import PLDPrivacyAccountant
z, delta, q, cases = json.loads(sys.argv[1])
out = []
for T, b in cases:
    made = {}
    def make(n, qq=q):  # what pfl's benchmarks pass: PLD, q = cohort / population, noise z
        made["k"] = n
        return PLDPrivacyAccountant(n, sampling_probability=qq, mechanism="gaussian", noise_parameter=z, delta=delta)
    t0 = time.perf_counter()
    mech = BandedMatrixFactorizationMechanism(clipping_bound=1.0, num_iterations=T, min_separation=b,
                                              make_privacy_accountant=make)
    t_mech = time.perf_counter() - t0
    t0 = time.perf_counter()
    eps_q = make(made["k"]).epsilon
    eps_1 = make(made["k"], 1.0).epsilon
    t_acc = time.perf_counter() - t0
    out.append(dict(T=T, b=b, k=made["k"], C=np.asarray(mech.query_matrix, dtype=float).tolist(),
                    noise_stddev=float(mech.relative_noise_stddev), eps_q1=eps_1, eps_q=eps_q,
                    seconds_factorize=t_mech, seconds_accounting=t_acc))
print("PFL_JSON " + json.dumps(out))
"""


def pfl_python(given: str | None) -> str:
    if given:
        return given
    env = OUT / "pflenv"
    py = env / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # the local CPU wheel (find-links), before pfl pulls one
        subprocess.run([*pip, "pfl==0.6.0"], check=True)
    cuda = subprocess.run([str(py), "-c", "import torch; print(torch.version.cuda)"], check=True,
                          capture_output=True, text=True).stdout.strip()
    if cuda != "None":
        raise SystemExit(f"{env} has a CUDA torch ({cuda}); remove it and install the CPU wheel")
    return str(py)


def run_pfl(python: str, cases: list[tuple[int, int]]) -> list[dict]:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pfl-", dir=OUT) as cwd:  # pfl writes ./banded_mf_dp_ftrl/query_matrix.npy
        proc = subprocess.run([python, "-c", PFL_PROGRAM, json.dumps([Z, DELTA, Q, cases])], cwd=cwd,
                              capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PFL_JSON ")]
    if proc.returncode or not lines:
        raise SystemExit(f"pfl program failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("PFL_JSON "):])


# -- sensitivity from the explicit matrix, independent of privlm.privacy.banded -------------------------------
def brute_force_sens2(C: np.ndarray, b: int, k: int) -> float:
    """max over patterns (<= k rounds, >= b apart) of sum_{i,j in pattern} |(C^T C)_ij|: exact when the pattern's
    columns are orthogonal, an upper bound otherwise (any unit vectors per participation)."""
    X = np.abs(C.T @ C)
    T = len(X)
    best = 0.0
    stack = [((), 0.0)]
    while stack:
        pattern, total = stack.pop()
        best = max(best, total)
        if len(pattern) == k:
            continue
        for j in range(pattern[-1] + b if pattern else 0, T):
            stack.append(((*pattern, j), total + X[j, j] + 2 * sum(X[i, j] for i in pattern)))
    return best


def dp_sens2(C: np.ndarray, b: int, k: int) -> float:
    """The same maximum of sum of squared column norms by dynamic program (jax_privacy's VecSens); it equals the
    brute force when columns >= b apart are orthogonal."""
    x = np.sum(C * C, axis=0)
    T = len(x)
    f = np.zeros(T + b)
    for _ in range(k):
        g = f.copy()
        g[:T] = x + f[b:b + T]
        f = np.maximum.accumulate(g[::-1])[::-1]
    return float(f[0])


def orthogonal_beyond(C: np.ndarray, b: int) -> bool:
    X = C.T @ C
    i, j = np.indices(X.shape)
    return bool(np.all(np.abs(X[np.abs(i - j) >= b]) < 1e-9))


def explicit_sens2(C: np.ndarray, b: int, k: int) -> dict:
    d = dp_sens2(C, b, k)
    brute = brute_force_sens2(C, b, k) if len(C) <= 40 else None
    if brute is not None and not math.isclose(brute, d, rel_tol=1e-9) and orthogonal_beyond(C, b):
        raise AssertionError(f"brute force {brute} != DP {d}")
    return {"dp": d, "brute": brute, "orthogonal": orthogonal_beyond(C, b), "sens2": brute if brute is not None else d}


def prefix_error(C: np.ndarray) -> float:
    return float(np.sum((np.tri(len(C)) @ np.linalg.inv(C)) ** 2))


def stock_eps(event: dp_accounting.DpEvent) -> float:
    acc = pld.PLDAccountant()
    acc.compose(event)
    return float(acc.get_epsilon(DELTA))


def case(p: dict) -> dict:
    T, b, k = p["T"], p["b"], p["k"]
    assert k == max_participations(T, b, None)
    q_group = min(1.0, b * Q)
    C = np.array(p["C"])
    col = np.linalg.norm(C, axis=0)
    s2 = explicit_sens2(C, b, k)
    sens = math.sqrt(s2["sens2"])
    pfl = {"seconds": p["seconds_factorize"] + p["seconds_accounting"], "seconds_factorize": p["seconds_factorize"],
           "col_norm_min": float(col.min()), "col_norm_max": float(col.max()),
           "row_norm_max": float(np.linalg.norm(C, axis=1).max()), "lower_triangular": bool(np.allclose(C, np.tril(C))),
           "assumed_sens": math.sqrt(k), "sens": sens, "sens_check": s2, "error": prefix_error(C),
           "eps_q1_pfl": p["eps_q1"], "eps_q_pfl": p["eps_q"],
           "eps_q1_true": stock_eps(dp_accounting.GaussianDpEvent(Z / sens)),
           "eps_q_maxcol": stock_eps(dp_accounting.SelfComposedDpEvent(  # the column norms alone, q as pfl has it
               dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(Z / col.max())), k)),
           "eps_qgroup_bound": stock_eps(dp_accounting.SelfComposedDpEvent(
               dp_accounting.PoissonSampledDpEvent(q_group, dp_accounting.GaussianDpEvent(Z / col.max())), k))}
    pfl["error_x_sens2"] = pfl["error"] * s2["sens2"]

    t0 = time.perf_counter()
    c = optimal_banded_toeplitz(T, b)
    t_opt = time.perf_counter() - t0
    Cp = strategy_matrix(c, T)
    s2p = explicit_sens2(Cp, b, k)
    mine = sensitivity_squared(c, T, k)
    m = BandedMF(num_clients=10 * T, clients_per_round=1, clip_norm_value=1.0, noise_multiplier=Z, coefficients=c,
                 rounds=T, sampling="none")
    t0 = time.perf_counter()
    eps_ledger = epsilon_for([m.event(t) for t in range(1, T + 1)], DELTA)
    t_acc = time.perf_counter() - t0
    amp = BandedMF(num_clients=100, clients_per_round=round(q_group * 100 / b), clip_norm_value=1.0,
                   noise_multiplier=Z, coefficients=c, rounds=T, sampling="cyclic-poisson")
    privlm = {"seconds": t_opt + t_acc, "coefficients": list(c), "error": workload_error(c, T),
              "error_explicit": prefix_error(Cp), "col_norm_min": float(np.linalg.norm(Cp, axis=0).min()),
              "col_norm_max": float(np.linalg.norm(Cp, axis=0).max()),
              "sens2": mine, "sens2_explicit": s2p, "sens": math.sqrt(mine),
              "eps_q1_ledger": eps_ledger, "eps_q1_stock": stock_eps(dp_accounting.GaussianDpEvent(Z / math.sqrt(mine))),
              "eps_qgroup": epsilon_for([amp.event(t) for t in range(1, T + 1, b)], DELTA),
              "q_group": amp.sampling_rate}
    privlm["error_x_sens2"] = privlm["error"] * mine
    return {"T": T, "b": b, "k": k, "q": Q, "q_group": q_group, "z": Z, "delta": DELTA, "pfl": pfl, "privlm": privlm}


def table(rows: list[dict]) -> str:
    head = ("| T | b | k | impl | col norm min/max | sens assumed / exact | err | err x sens^2 | eps q=1 "
            "reported / true | eps q=0.1 reported / true bound (q_grp) | s |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        f, p = r["pfl"], r["privlm"]
        lines.append(f"| {r['T']} | {r['b']} | {r['k']} | pfl | {f['col_norm_min']:.3f}/{f['col_norm_max']:.3f} | "
                     f"{f['assumed_sens']:.4f} / {f['sens']:.4f} | {f['error']:.2f} | {f['error_x_sens2']:.1f} | "
                     f"{f['eps_q1_pfl']:.3f} / {f['eps_q1_true']:.3f} | {f['eps_q_pfl']:.3f} / "
                     f"{f['eps_qgroup_bound']:.3f} ({r['q_group']:g}) | {f['seconds']:.1f} |")
        ex = math.sqrt(p["sens2_explicit"]["sens2"])
        lines.append(f"| {r['T']} | {r['b']} | {r['k']} | privlm | {p['col_norm_min']:.3f}/{p['col_norm_max']:.3f} | "
                     f"{p['sens']:.4f} / {ex:.4f} | {p['error']:.2f} | {p['error_x_sens2']:.1f} | "
                     f"{p['eps_q1_ledger']:.3f} / {p['eps_q1_stock']:.3f} | {p['eps_qgroup']:.3f} "
                     f"({p['q_group']:g}) | {p['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pfl-python", help="an interpreter with pfl 0.6.0 (default: make benchmarks/out/pflenv)")
    ap.add_argument("--cases", default="20x4,40x4,40x8", help="comma-separated TxB (rounds x min-separation)")
    ap.add_argument("--out", type=Path, default=OUT / "banded_mf_vs_pfl.json")
    args = ap.parse_args()
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
    t0 = time.perf_counter()
    pfl_rows = run_pfl(pfl_python(args.pfl_python), cases)
    print(f"pfl: {time.perf_counter() - t0:.1f} s for {len(cases)} cases (factorization + its accountant)")
    rows = [case(p) for p in pfl_rows]
    for r in rows:
        p = r["privlm"]
        assert math.isclose(p["sens2"], p["sens2_explicit"]["sens2"], rel_tol=1e-9), (r["T"], r["b"], p)
        assert math.isclose(p["error"], p["error_explicit"], rel_tol=1e-6), (r["T"], r["b"], p)
    print(f"z={Z}, delta={DELTA:g}, k=ceil(T/b); pfl 'true' q=1: stock PLD Gaussian(z/exact sens); "
          f"q=0.1 bound: k x PoissonSampled(q_grp=b*0.1, Gaussian(z/max col norm)); privlm q=1: ledger / stock;\n"
          "err = ||A C^-1||_F^2 (A: prefix sums); err x sens^2: total error at equal epsilon without sampling\n")
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
