"""The Flower runtime: privlm's ServerApp and ClientApp, and ``privlm deploy-local``.

An executor (:class:`~privlm.runtime.flower.server_app.FlowerExecutor`): the round is the
engine's own (budget, ledger, sampling, clip, noise, server step), with updates arriving
as Flower messages instead of from in-process training.
"""
