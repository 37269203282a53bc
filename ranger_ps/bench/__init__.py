"""Benchmarks: how close the wire, the update and training come to the machine and to other stacks.

One module per concept, the command line (:mod:`ranger_ps.cli.bench`) on top:

- :mod:`.settings`: what ``bench wire``, ``bench apply`` and ``bench train`` take (their flags);
- :mod:`.wire`, :mod:`.apply`, :mod:`.train`: the three benchmarks, each returning one JSON-ready object;
- :mod:`.baselines`: raw TCP, bare ``grpc.aio``, ``torch.distributed.rpc``, one-process SGD and DDP,
  and the entry of their helper processes;
- :mod:`.processes`: the benchmarks' child processes, through :mod:`ranger_ps.orchestration.launcher`;
- :mod:`.common`: machine info, timing loops, rates, ratios and targets;
- :mod:`.tables` and :mod:`.plots`: results as Markdown and PNG;
- :mod:`.cost_model`: the bottleneck model built on ``wire`` and ``train`` results
  (``python -m ranger_ps.bench.cost_model``);
- :mod:`.convergence`: accuracy and bytes pushed across push fractions (``bench convergence``).

Results, commands and the cost model: ``docs/benchmarks.md``.
"""
