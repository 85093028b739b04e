"""The Fashion-MNIST study of ``studies/fashion_mnist.py``, split into short modules.

- :mod:`.config`: the ``cpu``, ``gpu`` and ``smoke`` configurations, the recipe, the cost model;
- :mod:`.points`: operating points of each method chosen by GMACs;
- :mod:`.registry`: every training run and every evaluated row, by stage;
- :mod:`.store`: the cache under ``results/fashion_mnist/<config>/`` (keys, atomic writes);
- :mod:`.execute`: one training run (new, resumed or reused) and one row's evaluation;
- :mod:`.measure`: interleaved speed with the busy-machine check, the paper's analyses;
- :mod:`.report`: matched-GMAC interpolation, curves, claims, plots, markdown;
- :mod:`.pipeline`: the steps, the plan (``--plan``), running in pieces, ``--only``;
- :mod:`.export`: the shipped models (``--export``).
"""
