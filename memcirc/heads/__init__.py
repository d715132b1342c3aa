"""Attention-head component scores (memcirc.heads.scores) and their figures (memcirc.heads.figures)."""
