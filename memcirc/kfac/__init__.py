"""K-FAC memorization editing (the library of the kfac_edit stage; Merullo et al. 2025, arXiv 2510.24256).

For a linear map y = W a (W: [out, in]) the K-FAC approximation of its Fisher is G ⊗ A with
A = E[a aᵀ] over the layer's inputs and G = E[g gᵀ] over the gradients of the loss w.r.t. its
output (pre-activation). In the joint eigenbasis (U_G, U_A) component (i, j) has curvature λ_i μ_j.
The edit writes W in that basis, C = U_Gᵀ W U_A, keeps the smallest set of components that holds a
fraction ρ of the total importance and zeroes the rest: W' = U_G (C ⊙ M) U_Aᵀ.

Modules: `targets` (which linear modules, and their weights as [out, in]), `factors` (collecting
and storing the factor sums, the factor blocks of an exact token budget), `budget` (the default
budget, the rank warning and the measured ranks), `resume` (a collection that survives SIGTERM),
`shards` (factor shards of a job array and their merge), `edit` (eigenbasis, component selection,
the edit itself), `card` (the edited model's README.md), `report` (the printed table, the rho
curve). The stage (inputs, sweep, outputs) is memcirc/stages/kfac_edit.py.

Choices (and where they differ from goodfire-ai/memorization_kfac):
- Factors are the inputs *without* a bias column (as the original); biases are never edited.
  GPT-2's Conv1D stores [in, out]; it is transposed to [out, in] on read and back on write.
- Factors are stored as SUMS Σ a aᵀ, Σ g gᵀ with the token count, so shards add up; the edit
  uses the means. The per-token loss is summed (not averaged) so G has no batch-size factor.
- Labels: sampled from the model's own next-token distribution with a seeded torch.Generator
  (true Fisher, default) or the data's next tokens (empirical Fisher). Every position but the
  last of each block contributes (the last has no data label).
- Eigendecomposition in float64 of the symmetrized factor, negative eigenvalues clamped to 0,
  optional damping added to both spectra.
- Selection keeps the smallest set of components whose importance reaches ρ · total (ties in
  row-major (i, j) order) without sorting: `original` (λ_i μ_j) by a threshold search on the two
  spectra (`select_product`), `modified` by a radix select over the float64 bit patterns
  (`select_modified`); the full sort `select_mask` is the reference both are tested against (the
  original runs a Python heap over up to 45 M pairs). ρ = 1 keeps every component (W unchanged),
  including components of zero importance that the "smallest set" would drop. Eigenbasis on the
  model's device; the reconstruction U_G (C ⊙ M) U_Aᵀ in float32 from the float64 C.
- Importance: `original` λ_i μ_j; `modified` λ_i μ_j |C_ij|² (the omrifahn / smarter variant).
"""
