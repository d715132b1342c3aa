"""K-FAC factor sums: collecting them with hooks on the edited modules, storing and reading them.

A token is one predicted position (every position but the last of a block). A = Σ a aᵀ over the
module inputs, G = Σ g gᵀ over the gradients of the SUMMED per-token cross entropy w.r.t. the
module outputs. Each batch's a aᵀ is computed in float32 and added to float64 running sums
(float32 on MPS, which has no float64), so sums over different groupings of the same batches
(shards) agree to float64 rounding.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from memcirc import artifacts as art
from memcirc.data import Columns, load_documents
from memcirc.errors import InputError
from memcirc.kfac.choices import LABELS as LABELS  # re-exported
from memcirc.kfac.targets import Target, stored_weight
from memcirc.models.tokenizer import BosPolicy, encode

MAX_FACTOR_BLOCK = 512    # longest factor block (tokens), whatever the model's context
FACTORS_FILE = "factors.safetensors"   # the factor sums of a kfac_edit run (and of each factor shard)


# -- the sums and their file -------------------------------------------------------------------

@dataclass
class Factors:
    """Sums A = Σ a aᵀ, G = Σ g gᵀ (float32) per module name, and the tokens they sum over."""

    A: dict[str, torch.Tensor]
    G: dict[str, torch.Tensor]
    n_tokens: int
    labels: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __add__(self, other: Factors) -> Factors:
        if set(self.A) != set(other.A) or self.labels != other.labels:
            raise InputError("cannot add factors of different modules or label modes")
        return Factors({k: self.A[k] + other.A[k] for k in self.A}, {k: self.G[k] + other.G[k] for k in self.G},
                       self.n_tokens + other.n_tokens, self.labels, dict(self.meta))

    def to(self, dtype: torch.dtype) -> Factors:
        return Factors({k: v.to(dtype) for k, v in self.A.items()}, {k: v.to(dtype) for k, v in self.G.items()},
                       self.n_tokens, self.labels, dict(self.meta))

    def only(self, targets: Sequence[Target]) -> Factors:
        """The sums of `targets` alone (a reused factors file may hold more modules)."""
        return Factors({t.name: self.A[t.name] for t in targets}, {t.name: self.G[t.name] for t in targets},
                       self.n_tokens, self.labels, self.meta)

    def save(self, path: Path, model_identity: dict[str, Any], targets: Sequence[Target]) -> None:
        tensors = {f"{k}.A": v for k, v in self.A.items()} | {f"{k}.G": v for k, v in self.G.items()}
        meta = {"model": json.dumps(model_identity, sort_keys=True), "n_tokens": str(self.n_tokens),
                "labels": self.labels, "modules": json.dumps([t.__dict__ for t in targets]),
                "extra": json.dumps(self.meta, sort_keys=True)}
        art.save_tensors(path, tensors, metadata=meta)


def load_factors(path: Path) -> tuple[Factors, dict[str, Any], list[dict[str, Any]]]:
    """(factors, model identity, module list) from a factors.safetensors file."""
    if not Path(path).is_file():
        raise InputError(f"factors file not found: {path}")
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any parse failure of a user file is bad input
        raise InputError(f"{path} is not a safetensors factors file ({e})") from None
    if "model" not in meta or "modules" not in meta:
        raise InputError(f"{path} has no K-FAC metadata (model, modules): not written by kfac_edit")
    tensors = art.load_tensors(path)
    modules = json.loads(meta["modules"])
    A = {m["name"]: tensors[f"{m['name']}.A"] for m in modules}
    G = {m["name"]: tensors[f"{m['name']}.G"] for m in modules}
    return (Factors(A, G, int(meta["n_tokens"]), meta["labels"], json.loads(meta.get("extra", "{}"))),
            json.loads(meta["model"]), modules)


# -- the factor data ---------------------------------------------------------------------------

def read_factor_tokens(source: str, tokenizer: Any, token_budget: int, bos: BosPolicy | None = None) -> np.ndarray:
    """The token stream of the factor data (a file, folder or Hub id): text encoded without special
    tokens (the BOS of `bos` goes on each block, `token_blocks`), a token document's leading BOS
    stripped, documents joined with EOS; read only as far as `token_blocks` can use for `token_budget`."""
    eos = tokenizer.eos_token_id
    parts: list[np.ndarray] = []
    n = 0
    for doc in load_documents(source, Columns()):
        if doc.tokens is not None:
            ids = bos.strip(doc.tokens) if bos is not None else doc.tokens
        else:
            ids = encode(tokenizer, doc.text or "")
        parts.append(np.asarray(ids, np.int64))
        if eos is not None:
            parts.append(np.asarray([eos], np.int64))
        n += len(ids) + 1
        # token_blocks reads at most budget * L / (L - 1) + L <= 2 * budget + MAX_FACTOR_BLOCK tokens
        # for any block length L >= 2 (fewer with a BOS per block): with that many, the budget decides
        # how many blocks there are, not the data.
        if n >= 2 * token_budget + MAX_FACTOR_BLOCK:
            break
    if not parts:
        raise InputError(f"factor data {source} holds no documents")
    return np.concatenate(parts)


def token_blocks(tokens: np.ndarray, block_len: int, token_budget: int, batch_size: int,
                 bos_id: int | None = None) -> list[torch.Tensor]:
    """Consecutive blocks of `block_len` tokens (BOS + block_len - 1 stream tokens when `bos_id` is
    set), batched, holding exactly `token_budget` predicted tokens (block_len - 1 per block): where
    the budget ends inside a block, a last, shorter block of its own makes the count exact. When the
    data holds fewer, all of its whole blocks (and fewer tokens)."""
    n_bos = int(bos_id is not None)
    content = block_len - n_bos            # stream tokens per block
    n_data = len(tokens) // content
    n_blocks, rest = divmod(token_budget, block_len - 1)
    if n_blocks >= n_data:                 # the data ends the collection: whole blocks only
        n_blocks, rest = n_data, 0
    if n_blocks == 0 and rest == 0:
        raise InputError(f"factor data holds {len(tokens)} tokens, fewer than one block of {block_len}")
    rows = torch.as_tensor(tokens[:n_blocks * content].reshape(n_blocks, content), dtype=torch.long)
    batches = list(_with_bos(rows, bos_id).split(batch_size)) if n_blocks else []
    if rest:                               # rest + 1 tokens predict rest
        start = n_blocks * content
        tail = torch.as_tensor(tokens[start:start + rest + 1 - n_bos], dtype=torch.long)[None]
        batches.append(_with_bos(tail, bos_id))
    return batches


def _with_bos(rows: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    if bos_id is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), bos_id, dtype=rows.dtype), rows], dim=1)


def n_predicted(batches: Sequence[torch.Tensor]) -> int:
    """The tokens `batches` hold for the factors: every position but the last of each block."""
    return sum(b.shape[0] * (b.shape[1] - 1) for b in batches)


def block_seed(seed: int, block: int) -> int:
    """The sampling seed of factor block `block`: labels depend on the block alone, not on the batch
    or the shard that holds it, so shards and a one-job run draw the same labels."""
    return int(np.random.SeedSequence([seed, block]).generate_state(1, np.uint64)[0]) >> 1


# -- collection --------------------------------------------------------------------------------

@dataclass(frozen=True)
class FactorOptions:
    """How factors are collected.

    labels: `sampled` draws y ~ softmax(logits) (true Fisher), `data` uses the next tokens
    (empirical Fisher). With `seed`, block r (counting from `first_block`) draws its labels with its
    own generator `block_seed(seed, r)`, so the labels do not depend on batching or sharding;
    otherwise the one `generator` stream serves all batches. `token_budget`: stop after the batch
    that reaches it (so shards that split the batch list add up exactly). `float64`: return the
    float64 running sums (shards, partial saves) instead of float32.
    """

    labels: str = "sampled"
    seed: int | None = None
    first_block: int = 0
    generator: torch.Generator | None = None
    token_budget: int | None = None
    float64: bool = False

    def __post_init__(self) -> None:
        if self.labels not in LABELS:
            raise InputError(f"labels must be 'sampled' or 'data', got {self.labels!r}")


@dataclass(frozen=True)
class Checkpoint:
    """`save(n, sums)` is called every `every` batches and after the last, with the batches done."""

    save: Callable[[int, Factors], None]
    every: int = 16


class _RunningSums:
    """The A and G running sums per module on the model's device, in the accumulation dtype."""

    def __init__(self, targets: Sequence[Target], device: torch.device, initial: Factors | None) -> None:
        self.acc = torch.float32 if device.type == "mps" else torch.float64
        self.A: dict[str, torch.Tensor | None] = {t.name: None for t in targets}
        self.G: dict[str, torch.Tensor | None] = {t.name: None for t in targets}
        if initial is not None:
            self.A = {t.name: initial.A[t.name].to(device, self.acc) for t in targets}
            self.G = {t.name: initial.G[t.name].to(device, self.acc) for t in targets}
        self.n_tokens = initial.n_tokens if initial is not None else 0

    def add(self, sums: dict[str, torch.Tensor | None], name: str, x: torch.Tensor) -> None:
        """Add xᵀx of one batch's [B, T, d] inputs or output gradients, the last position dropped."""
        x = x.detach()[:, :-1].reshape(-1, x.shape[-1]).float()
        xx = (x.t() @ x).to(self.acc)
        prev = sums[name]
        sums[name] = xx if prev is None else prev + xx

    def factors(self, dtype: torch.dtype, labels: str) -> Factors:
        return Factors({k: _recorded(k, v).to("cpu", dtype) for k, v in self.A.items()},
                       {k: _recorded(k, v).to("cpu", dtype) for k, v in self.G.items()}, self.n_tokens, labels)


def _recorded(name: str, total: torch.Tensor | None) -> torch.Tensor:
    """A running sum that a batch has added to (every forward and backward reaches every target)."""
    if total is None:
        raise RuntimeError(f"no K-FAC factor sums were recorded for module {name}")
    return total


@contextmanager
def _recording(model: torch.nn.Module, targets: Sequence[Target], sums: _RunningSums) -> Iterator[list]:
    """Hooks that add every forward's inputs and backward's output gradients of the targets to `sums`,
    in eval mode (no dropout: the Fisher of the deployed model). Yields the targets' weights; their
    requires_grad flags, the grads and the training mode are restored on exit."""
    def hook(name: str):  # noqa: ANN202
        def forward_hook(_module, inputs, output):  # noqa: ANN001, ANN202
            if not torch.is_grad_enabled():
                return
            sums.add(sums.A, name, inputs[0])
            output.register_hook(lambda g: sums.add(sums.G, name, g))
        return forward_hook

    was_training = model.training
    params = [stored_weight(model, t) for t in targets]
    flags = [p.requires_grad for p in params]
    handles = []
    try:
        model.eval()
        for p in params:
            p.requires_grad_(True)  # the graph must reach the edited layers' outputs
        for t in targets:
            handles.append(model.get_submodule(t.name).register_forward_hook(hook(t.name)))
        yield params
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
        model.train(was_training)


def _draw_labels(logits: torch.Tensor, ids: torch.Tensor, opts: FactorOptions, block: int) -> torch.Tensor:
    """The labels of a batch whose first block is number `block` (see FactorOptions)."""
    if opts.labels == "data":
        return ids[:, 1:]
    rows, n = ids.shape[0], logits.shape[1]
    if opts.seed is not None:   # block r's uniforms from its own generator: batching-independent
        u = torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(block_seed(opts.seed, block + r)))
                         for r in range(rows)])
    else:
        gen_device = opts.generator.device if opts.generator is not None else torch.device("cpu")
        u = torch.rand(rows, n, generator=opts.generator, device=gen_device).cpu()
    with torch.no_grad():   # one row at a time: no [B, T, V] copy of the logits
        return torch.stack([_inverse_cdf(logits[r].detach(), u[r].to(logits.device)) for r in range(rows)])


def _inverse_cdf(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One draw y ~ softmax(logits) per position ([T, V] logits, [T] uniforms in [0, 1)).

    Inverse-CDF sampling needs one uniform per position, where torch.multinomial fills V exponential
    variates per position (9x the cost of the whole draw, on the testbed's vocabulary)."""
    cdf = (logits - logits.amax(-1, keepdim=True)).exp_().cumsum_(-1)   # unnormalized: scale u instead
    total = cdf[:, -1:]
    if not bool(torch.isfinite(total).all()):
        raise FloatingPointError("the model's logits are not finite: cannot sample K-FAC labels")
    below = torch.nextafter(total, torch.zeros_like(total))   # u * total may round up to total
    v = torch.minimum(u[:, None].to(cdf.dtype) * total, below)
    return torch.searchsorted(cdf, v, right=True).view(-1)   # first j with cdf[j] > v: p_j > 0


def _backward(model: torch.nn.Module, ids: torch.Tensor, opts: FactorOptions, block: int) -> None:
    """One forward and backward pass of the summed cross entropy (the hooks record the factors)."""
    with torch.enable_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        y = _draw_labels(logits, ids, opts, block)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="sum")
        loss.backward()


def collect_factors(model: torch.nn.Module, targets: Sequence[Target], token_batches: Iterable[torch.Tensor],
                    opts: FactorOptions = FactorOptions(), initial: Factors | None = None,
                    checkpoint: Checkpoint | None = None) -> Factors:
    """Accumulate A and G sums over `token_batches` ([B, T] int64, unpadded blocks).

    `initial` continues earlier sums (a resumed or later shard: set `opts.first_block` to its block
    count); `checkpoint` saves the running sums as it goes. Returns float32 sums unless `opts.float64`.
    """
    device = next(model.parameters()).device
    sums = _RunningSums(targets, device, initial)
    block, done = opts.first_block, 0
    with _recording(model, targets, sums) as params:
        for ids in token_batches:
            if opts.token_budget is not None and sums.n_tokens >= opts.token_budget:
                break
            ids = ids.to(device)
            _backward(model, ids, opts, block)
            for p in params:
                p.grad = None
            sums.n_tokens += ids.shape[0] * (ids.shape[1] - 1)
            block += ids.shape[0]
            done += 1
            if checkpoint is not None and done % checkpoint.every == 0:
                checkpoint.save(done, sums.factors(sums.acc, opts.labels))
    if sums.n_tokens == 0:
        raise InputError("no tokens to collect K-FAC factors on (empty factor data or zero budget)")
    result = sums.factors(torch.float64 if opts.float64 else torch.float32, opts.labels)
    if checkpoint is not None and done % checkpoint.every:
        checkpoint.save(done, result if opts.float64 else sums.factors(sums.acc, opts.labels))
    return result
