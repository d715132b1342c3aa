"""The K-FAC edit's named choices, in a module without torch: the kfac_edit config (and so its
`--help`) reads them before any heavy import. `memcirc.kfac.edit` and `memcirc.kfac.factors`
re-export them where they always were."""

FORMULAS = ("original", "modified")   # importance: lambda*mu, or lambda*mu*|C|^2
LABELS = ("sampled", "data")          # gradient labels: sampled from the model (true Fisher) or the data's
