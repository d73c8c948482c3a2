"""Multi-label classification: several labels per image (pure compute, no Ray/MLflow/HTTP).

Modules (import the one you need; this package imports nothing, so importing it is free):

* ``labelsets`` — label sets <-> the canonical record key (``"cat|dog"``) and indicator matrices.
* ``stratify`` — iterative stratification (Sechidis et al. 2011) of a label-indicator matrix.
* ``metrics`` — per-label AP, mAP, per-label F1-optimal thresholds, micro/macro F1, subset
  accuracy, and a paired bootstrap of the mAP difference of two candidates on the same images.
* ``base`` — ``MultiLabelHead``: the sklearn-style contract every multi-label head follows.
* ``probe`` / ``knn`` / ``mlp`` — one-vs-rest logistic probe (the batched L-BFGS weight-decay
  sweep of ``pipeline.heads.batched_lbfgs``), FAISS k-NN label voting, a sigmoid MLP.
* ``crossval`` — out-of-fold probabilities (threshold tuning without touching test data).
* ``heads`` — ``MULTILABEL_HEADS`` (short name -> class) and ``load_multilabel_head(dir)``;
  kept apart from the single-label ``pipeline.heads.HEADS`` registry on purpose.
* ``predictor`` — ``MultiLabelPredictor``: backbone + head + thresholds (+ a FAISS support
  index voting label sets) -> a list of {label, score} per image, or an abstention.
"""
