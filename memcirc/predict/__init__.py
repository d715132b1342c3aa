"""Predicting memorization from the data alone (the library of the predict_memorization stage; the
seed "Predicting Memorization", after Biderman et al. 2023, "Emergent and Predictable Memorization").

- `labels`: labelled sequences, from a memorization run's windows (the memorized rule) or from
  label tables (memorized sequences + random controls, optionally a score column);
- `ngram`: the n-gram duplication index of the training corpus (backends `suffixindex`, tokengrams on
  disk, and `hashindex`, 64-bit hashes in memory; their shared file `indexfile`), and the corpus readers;
- `features`: features that never look at the target model (surprisal under a smaller reference
  model, duplication, rarity, compressibility, repetition, length/position, domain, a shuffled control);
- `evaluate`: AUROC / PR-AUC / t-intervals (sklearn.metrics, scipy.stats), the classifiers,
  stratified cross-validation and grouped permutation importance;
- `baseline`: the seed's baseline, "memorized by a smaller model";
- `onset`: when: regression of the onset checkpoint found by training_dynamics;
- `report`: summary.json, the feature / prediction rows and the text table;
- `figures`: ROC, precision-recall, importance, feature distributions, onset.

The stage itself (config, input checks, run, headline) is `memcirc.stages.predict_memorization`.
"""
