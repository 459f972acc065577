"""The lab: does BatchNorm or Dropout help this model on this data? (``normdrop lab``)

- :mod:`~normdrop.lab.data`: datasets, the user's files, stratified splits, standardization.
- :mod:`~normdrop.lab.models`: simplenet, mlp:DxW, cnn:small, and where BN and Dropout go.
- :mod:`~normdrop.lab.train`: one run, in memory, reproducible and resumable.
- :mod:`~normdrop.lab.store`: the SQLite run database; :mod:`~normdrop.lab.scheduler`: runs
  trained resumably, in parallel processes when faster.
- :mod:`~normdrop.lab.stats` and :mod:`~normdrop.lab.summary`: intervals and paired tests.
- :mod:`~normdrop.lab.plots`, :mod:`~normdrop.lab.report`: figures and the HTML report.
- :mod:`~normdrop.lab.experiment` (``normdrop lab``), :mod:`~normdrop.lab.tune`
  (``normdrop tune``), :mod:`~normdrop.lab.runs` (``normdrop runs``).
- :mod:`~normdrop.lab.seed`: the seed tutorial's system (``normdrop seed``).

Submodules are imported on use, so ``import normdrop`` stays light.
"""
