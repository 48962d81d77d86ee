"""The training application: ``imaml-ext train / eval / plot / demo / info``.

Built on the library (``imaml_ext``), which does not import it.  Needs the
``train`` extra (tqdm, Pillow, matplotlib): ``pip install 'imaml_ext[train]'``.

* :mod:`.experiment`: the run configuration (:class:`~.experiment.TrainConfig`,
  :class:`~.experiment.RunOptions`) and the model, tasks and loss it implies.
* :mod:`.flags`: configuration fields declared once (rule, help, flag).
* :mod:`.methods`: the method registry (training algorithm, options,
  test-time adaptation per ``--method``).
* :mod:`.presets`: named configurations (the iMAML paper's Omniglot runs).
* :mod:`.train`: one meta-step and the resumable training loop.
* :mod:`.evaluate`: test-time adaptation and few-shot scores.
* :mod:`.checkpoint`: atomic checkpoints and the random-number state.
* :mod:`.metrics`: the metrics file (writing, reading).
* :mod:`.runfolder`: the run folder's lock and the clean-up of interrupted writes.
* :mod:`.gradcheck`: the outer step refused on a non-finite meta-gradient.
* :mod:`.plotting`: learning curves and the demo's figures.
* :mod:`.demo`: the sinusoid example.
* :mod:`.cli`: the command line.
"""
