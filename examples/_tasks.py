"""Task and probe data shared by the examples and ``benchmarks/bench_finetune.py``.

Everything is generated or written out here, nothing is downloaded:

* **Addition task** — ``"47+58=105"``: two 2-digit numbers whose sum has 3 digits. SmolLM2's tokenizer splits
  digits, so every item is exactly 9 tokens (6 prompt, 3 answer) and batches need no padding. The loss is on the
  answer tokens only, and because the answer is the last 3 tokens only the last 3 positions' logits are computed
  (``logits_to_keep``), which spares most of the 49152-way output head. Exact match is the teacher-forced argmax
  of all three answer digits, which equals the greedy completion. The base model scores about 1 %.
* **Knowledge probe** — capital-city cloze prompts in both directions (``"… The capital of France is" →
  " Paris"``, ``"… Paris is the capital of" → " France"``, each after two solved examples), scored by the answer's
  mean log-likelihood per item and by accuracy (every answer token the argmax). :data:`KNOWLEDGE_TEXTS` is
  calibration text for CorDA-KPA about *other* countries and general facts — disjoint from the probe items
  (asserted at import).
* **Text** — ``pydoc_data.topics`` (Python's own documentation) for perplexity and calibration.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ANSWER_LEN", "PROMPT_LEN", "addition_split", "encode_addition", "addition_loss", "addition_eval",
    "task_texts", "PROBE_CAPITALS", "CALIB_CAPITALS", "KNOWLEDGE_TEXTS", "probe_items", "knowledge_probe",
    "pydoc_texts", "perplexity", "train_addition", "smooth", "steps_to", "parse_targets", "add_finetune_args",
    "default_lora", "model_or_default", "TARGETS_HELP", "MODEL_HELP",
]

PROMPT_LEN, ANSWER_LEN = 6, 3  # "47+58=" and "105"

# ----------------------------------------------------------------------------------------------- addition task


def addition_split(n_test: int = 256, seed: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """All pairs (a, b) of 2-digit numbers with a 3-digit sum (4860 pairs), shuffled with ``seed`` and split
    into ``(train, test)``; ``test`` holds ``n_test`` held-out pairs never seen in training."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100) if a + b >= 100]
    random.Random(seed).shuffle(pairs)
    return pairs[n_test:], pairs[:n_test]


def encode_addition(tokenizer, pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Token ids (n, 9) of ``"a+b=sum"``; raises if the tokenizer does not split digits (the fixed layout relies on it)."""
    rows = [tokenizer(f"{a}+{b}={a + b}", add_special_tokens=False)["input_ids"] for a, b in pairs]
    bad = [r for r in rows if len(r) != PROMPT_LEN + ANSWER_LEN]
    if bad:
        raise ValueError(f"addition items must be {PROMPT_LEN + ANSWER_LEN} tokens (digits split); got {len(bad[0])} "
                         f"for {tokenizer.decode(bad[0])!r}")
    return torch.tensor(rows, dtype=torch.long)


def _answer_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits (n, 3, vocab) that predict the 3 answer tokens of ``ids`` (n, 9): positions 5, 6, 7."""
    return model(input_ids=ids[:, :-1], logits_to_keep=ANSWER_LEN).logits.float()


def addition_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a batch ``ids`` (n, 9); the prompt tokens carry no loss."""
    logits = _answer_logits(model, ids)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, PROMPT_LEN:].reshape(-1))


@torch.no_grad()
def addition_eval(model: nn.Module, ids: torch.Tensor, batch_size: int = 128) -> dict[str, float]:
    """Held-out ``{"accuracy": exact match of all 3 digits, "loss": answer cross-entropy}`` on ``ids`` (n, 9)."""
    was = model.training
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(ids), batch_size):
        b = ids[i:i + batch_size]
        logits = _answer_logits(model, b)
        correct += int((logits.argmax(-1) == b[:, PROMPT_LEN:]).all(-1).sum())
        loss += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, PROMPT_LEN:].reshape(-1),
                                      reduction="sum"))
    model.train(was)
    return {"accuracy": correct / len(ids), "loss": loss / (len(ids) * ANSWER_LEN)}


def task_texts(pairs: Sequence[tuple[int, int]]) -> list[str]:
    """The training items as text, for CorDA-IPA task calibration (one item per text)."""
    return [f"{a}+{b}={a + b}" for a, b in pairs]


# ----------------------------------------------------------------------------------------------- knowledge

PROBE_CAPITALS: dict[str, str] = {
    "France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Italy": "Rome", "Germany": "Berlin",
    "Spain": "Madrid", "Russia": "Moscow", "China": "Beijing", "Egypt": "Cairo", "Greece": "Athens",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Poland": "Warsaw", "Austria": "Vienna", "Hungary": "Budapest", "Argentina": "Buenos Aires", "Peru": "Lima",
    "Chile": "Santiago", "Thailand": "Bangkok", "South Korea": "Seoul", "Indonesia": "Jakarta", "Cuba": "Havana",
    "England": "London", "Iran": "Tehran", "Denmark": "Copenhagen", "Belgium": "Brussels", "Mexico": "Mexico City",
}

CALIB_CAPITALS: dict[str, str] = {
    "Canada": "Ottawa", "India": "New Delhi", "Turkey": "Ankara", "the Netherlands": "Amsterdam",
    "Switzerland": "Bern", "the Czech Republic": "Prague", "Romania": "Bucharest", "Ukraine": "Kyiv",
    "Vietnam": "Hanoi", "the Philippines": "Manila", "Pakistan": "Islamabad", "Nigeria": "Abuja",
    "Ethiopia": "Addis Ababa", "Morocco": "Rabat", "Colombia": "Bogota", "Venezuela": "Caracas", "Iraq": "Baghdad",
    "Syria": "Damascus", "Saudi Arabia": "Riyadh", "Afghanistan": "Kabul", "Nepal": "Kathmandu",
    "Iceland": "Reykjavik", "Scotland": "Edinburgh", "Lebanon": "Beirut", "Jamaica": "Kingston", "Ghana": "Accra",
    "Serbia": "Belgrade", "Bulgaria": "Sofia", "Croatia": "Zagreb", "Malaysia": "Kuala Lumpur",
}

_GENERAL_FACTS = [
    "Water boils at 100 degrees Celsius at sea level and freezes at 0 degrees.",
    "The Pacific is the largest ocean on Earth, and Jupiter is the largest planet in the solar system.",
    "Mount Everest, in the Himalayas, is the highest mountain in the world.",
    "The Amazon river flows through Brazil into the Atlantic Ocean.",
    "William Shakespeare wrote Hamlet, Macbeth and Romeo and Juliet.",
    "The chemical symbol for gold is Au, and the chemical symbol for iron is Fe.",
    "Albert Einstein developed the theory of relativity.",
    "The Great Wall stretches for thousands of kilometres and was built over many centuries.",
    "The human heart has four chambers and pumps blood through the body.",
    "Light travels faster than sound.",
    "The Sahara is the largest hot desert in the world and covers much of North Africa.",
    "Isaac Newton described the laws of motion and universal gravitation.",
    "The Moon orbits the Earth about once every 27 days.",
    "Leonardo da Vinci painted the Mona Lisa.",
    "Oxygen and hydrogen combine to form water.",
    "The Nile is one of the longest rivers in the world.",
]

KNOWLEDGE_TEXTS: list[str] = (
    [f"The capital of {c} is {cap}. {cap} is the largest city of {c} or its seat of government."
     for c, cap in CALIB_CAPITALS.items()]
    + [f"{cap} is the capital of {c}." for c, cap in CALIB_CAPITALS.items()]
    + _GENERAL_FACTS
)

# the KPA calibration text must not contain the probe's answers: otherwise "knowledge preserved" is leakage
_leak = [w for w in list(PROBE_CAPITALS) + list(PROBE_CAPITALS.values())
         if any(re.search(rf"\b{re.escape(w)}\b", t) for t in KNOWLEDGE_TEXTS)]
assert not _leak, f"knowledge calibration text mentions probe items: {_leak}"


# Two solved examples in front of every probe prompt fix the format (zero-shot, the reverse direction mostly
# continues " the state of ..."); they are calibration countries, never probe items.
_SHOTS = ("Canada", "Turkey")
assert all(c in CALIB_CAPITALS and c not in PROBE_CAPITALS for c in _SHOTS)


def probe_items() -> list[tuple[str, str]]:
    """(prompt, answer) pairs of the knowledge probe: 30 countries, both directions (60 items), each prompt
    led by two solved examples about calibration countries (SmolLM2-135M passes 58 of the 60)."""
    fw = " ".join(f"The capital of {c} is {CALIB_CAPITALS[c]}." for c in _SHOTS)
    rv = " ".join(f"{CALIB_CAPITALS[c]} is the capital of {c}." for c in _SHOTS)
    items = [(f"{fw} The capital of {c} is", f" {cap}") for c, cap in PROBE_CAPITALS.items()]
    items += [(f"{rv} {cap} is the capital of", f" {c}") for c, cap in PROBE_CAPITALS.items()]
    return items


@torch.no_grad()
def knowledge_probe(model: nn.Module, tokenizer, items: Sequence[tuple[str, str]] | None = None) -> dict[str, float]:
    """Score cloze items: ``{"logprob": mean over items of the answer's mean per-token log-probability,
    "accuracy": fraction of items whose every answer token is the argmax}``. One right-padded batch."""
    items = probe_items() if items is None else list(items)
    seqs, spans = [], []
    for prompt, answer in items:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        seqs.append(p + a)
        spans.append((len(p), len(a)))
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    was = model.training
    model.eval()
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    model.train(was)
    lps, hits = [], 0
    for i, (p, a) in enumerate(spans):
        target = ids[i, p:p + a]
        pred = logp[i, p - 1:p + a - 1]  # position t predicts token t+1
        lps.append(float(pred.gather(-1, target[:, None]).mean()))
        hits += int((pred.argmax(-1) == target).all())
    return {"logprob": sum(lps) / len(lps), "accuracy": hits / len(items)}


# ----------------------------------------------------------------------------------------------- text


def pydoc_texts() -> list[str]:
    """Python's documentation topics (79 texts of English prose and code), in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


@torch.no_grad()
def perplexity(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], progress: bool = False) -> float:
    """Token-weighted next-token perplexity over ``batches`` (dicts with ``input_ids`` / ``attention_mask``,
    e.g. from :func:`svdadapt.text_batches`); padding is excluded."""
    from tqdm.auto import tqdm

    was = model.training
    model.eval()
    total, count = 0.0, 0
    for b in tqdm(batches, desc="perplexity", disable=not progress, unit="batch"):
        ids, mask = b["input_ids"], b.get("attention_mask", torch.ones_like(b["input_ids"]))
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                       ignore_index=-100, reduction="sum"))
        count += int((target != -100).sum())
    model.train(was)
    return float(torch.exp(torch.tensor(total / count)))


# ----------------------------------------------------------------------------------------------- command line
TARGETS_HELP = "'all-linear' or comma-separated module suffixes, e.g. q_proj,v_proj (the same for every method)"
MODEL_HELP = "model directory or .gguf (default: bundled SmolLM2-135M)"


def add_finetune_args(p, *, batch_size: int = 16) -> None:
    """The options the fine-tuning examples share: ``--rank --targets --batch-size --lr --n-test --model --seed``."""
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="all-linear", help=TARGETS_HELP)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=None, help="default: per method (see DEFAULT_LR)")
    p.add_argument("--n-test", type=int, default=256, help="held-out addition items scored")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--seed", type=int, default=0)


def default_lora(model: nn.Module, rank: int, targets="all-linear", seed: int = 0) -> nn.Module:
    """``model`` wrapped by PEFT with its default LoRA init (B = 0, A Kaiming-uniform), alpha = rank: the baseline
    the svdadapt methods are compared with. PEFT draws A from the global RNG, so it is seeded with ``seed`` inside
    ``fork_rng``: the caller's RNG is left as it was."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0,
                                                task_type="CAUSAL_LM"))


def model_or_default(model, tokenizer, path: str | None):
    """``(model, tokenizer)`` as passed in (tests pass the session's model), else loaded from ``path`` (a directory
    or .gguf), else the bundled SmolLM2-135M-Instruct."""
    if model is not None:
        return model, tokenizer
    from svdadapt.loading import load_model, load_smollm2, load_tokenizer

    return (load_model(path), load_tokenizer(path)) if path else load_smollm2()


# ----------------------------------------------------------------------------------------------- training


def parse_targets(spec: str) -> str | list[str]:
    """``--targets`` of the examples: ``"all-linear"`` or comma-separated module-name suffixes (``"q_proj,v_proj"``),
    in the form ``svdadapt.wrap``, ``peft.LoraConfig`` and ``svdadapt.compress`` all accept."""
    if spec.strip().lower() == "all-linear":
        return "all-linear"
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--targets must be 'all-linear' or comma-separated module names, got {spec!r}")
    return names


def train_addition(model: nn.Module, train_ids: torch.Tensor, *, steps: int, lr: float, batch_size: int = 16,
                   seed: int = 0, warmup: int = 10, max_grad_norm: float = 1.0, eval_ids: torch.Tensor | None = None,
                   eval_every: int = 0, progress: bool = True, desc: str = "train") -> dict:
    """Train the trainable parameters of ``model`` on the addition task with AdamW (no weight decay), ``warmup``
    linear warm-up steps then linear decay to 0, gradient clipping at ``max_grad_norm``.

    Each step draws ``batch_size`` items (without replacement within the step) from ``train_ids`` (n, 9) with a
    private ``random.Random(seed)``, so the data order depends on ``seed`` only.

    Returns ``{"losses": [per-step training loss], "curve": [(step, held-out accuracy, held-out loss)] every
    ``eval_every`` steps on ``eval_ids``, "train_s": seconds spent in training steps (evaluation excluded)}``.
    """
    import time

    from tqdm.auto import tqdm

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps!r}, batch_size={batch_size!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * max(0.0, 1.0 - s / steps))
    rng = random.Random(seed)
    losses: list[float] = []
    curve: list[tuple[int, float, float]] = []
    train_s = 0.0
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, unit="step")
    for step in bar:
        t0 = time.perf_counter()
        batch = train_ids[rng.sample(range(len(train_ids)), batch_size)]
        loss = addition_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_s += time.perf_counter() - t0
        losses.append(loss.item())
        if eval_ids is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            ev = addition_eval(model, eval_ids)
            curve.append((step + 1, ev["accuracy"], ev["loss"]))
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", acc=f"{ev['accuracy']:.2f}")
        elif step % 10 == 9:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return {"losses": losses, "curve": curve, "train_s": train_s}


def smooth(values: Sequence[float], window: int = 10) -> list[float]:
    """Trailing moving average (the first points average what there is)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def steps_to(values: Sequence[float], target: float, window: int = 10) -> int | None:
    """First step (1-based) at which the ``window``-step moving average of ``values`` is <= ``target``; None if never."""
    for i, v in enumerate(smooth(values, window)):
        if v <= target:
            return i + 1
    return None
