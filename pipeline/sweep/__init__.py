"""The pure parts of a sweep (no Ray, no MLflow), one module per concern:

- `plan`: feature sets, head configurations, candidate names, per-candidate parameters;
- `folds`: how candidates are scored without the test split (k-fold CV on train+val, or the
  validation split on large sets) and the fold of every image;
- `features`: one feature set read from the feature store in that layout; backbone latency;
- `cv`: out-of-fold predictions of one head, hyper-parameters chosen inside the folds, refit;
- `candidate`: a candidate end to end (selection score, refit, the test split scored once);
- `ensemble`: heads on concatenated backbones and Caruana ensemble selection;
- `calibrate`: decision thresholds from out-of-fold predictions;
- `leaderboard`, `report`: the rows, their display, report.html.

`jobs.sweep` schedules these on Ray and logs them to MLflow.
"""
