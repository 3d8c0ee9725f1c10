"""The Flower runtime: privlm's ServerApp and ClientApp, and ``privlm deploy-local``.

A thin adapter: the server round is :class:`privlm.runtime.simulation.Simulation`'s
own (budget, ledger, sampling, clip, noise, server step), with updates arriving
as Flower messages instead of from in-process training.
"""
