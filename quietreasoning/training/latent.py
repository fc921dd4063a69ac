"""Training latent reasoning: one mechanism (think blocks through the KV cache, model/latent.py),
three recipes: the Coconut curriculum, CoDi self-distillation and the stochastic loop (REINFORCE + KL).

A reasoning example is (question, chain-of-thought steps, answer). It is tokenised part by part:
  question  <bos> + the question text + "\\n"
  steps     each step's text + "\\n"
  answer    "### " + the answer + <eos>

Stage c of the Coconut curriculum (Hao et al. 2024) replaces the first r = min(c, #steps) steps of
an example with r * n thoughts (n = latent.thoughts_per_step):
  c = 0     question, steps, answer: plain chain-of-thought training (the teacher)
  c >= 1    question <bot> [r*n thoughts] <eot> remaining steps, answer
The loss is the cross-entropy of the remaining steps and the answer (never the question, the
thoughts, or the forced <eot>). The last stage replaces every step (all-latent).

CoDi (Shen et al. 2025) trains the teacher and the student in one step with shared weights: the
teacher sees the whole chain of thought (c = 0), the student thinks K = latent.k_max thoughts and
answers; the hidden states after every block at the token that predicts the first answer token are
aligned, L1 divided by the teacher's per-layer standard deviation, teacher stop-gradient; the
loss adds both cross-entropies.

Batch layout (numpy, built on the host; `make_batch`): the prefix (question, and <bot> when the
stage thinks) is left-padded to Lp so every row's prefix ends at the same slot; `active` (B, S)
marks the S thought slots each row runs (rows with fewer replaced steps skip the rest); the suffix
(<eot>, remaining steps, answer) is right-padded to Ls. `latent_forward` runs prefix, thoughts and
suffix through one KV cache; `predictors[:, j]` is the hidden state that predicts `suffix[:, j]`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from quietreasoning.config import Config
from quietreasoning.model.latent import LatentReasoner, think
from quietreasoning.training.optimizer import make_optimizer

ANSWER_MARKER = "### "


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One example's token ids, part by part (see the module docstring)."""
    question: list[int]
    steps: list[list[int]]
    answer: list[int]


def encode(tokenizer, example: dict) -> Encoded:
    return Encoded([tokenizer.bos_id, *tokenizer.encode(example["question"] + "\n")],
                   [tokenizer.encode(s + "\n") for s in example["steps"]],
                   [*tokenizer.encode(ANSWER_MARKER + str(example["answer"])), tokenizer.eos_id])


def _round_up(n: int, multiple: int = 8) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def padded_lengths(examples: Sequence[Encoded]) -> tuple[int, int]:
    """(Lp, Ls) that fit every example at every stage: one shape per stage, one compilation."""
    lp = max(len(ex.question) for ex in examples) + 1
    ls = max(sum(map(len, ex.steps)) + len(ex.answer) for ex in examples) + 1
    return _round_up(lp), _round_up(ls)


def make_batch(examples: Sequence[Encoded], stage: int, thoughts_per_step: int, bot_id: int, eot_id: int,
               *, fixed_k: int | None = None, lengths: tuple[int, int] | None = None,
               pad_id: int = 0) -> dict[str, np.ndarray]:
    """The arrays of one batch at curriculum `stage` (see the module docstring). `fixed_k`: every
    row thinks exactly that many thoughts and all its steps are replaced (CoDi's student); 0 with
    stage 0 is the chain-of-thought teacher. `lengths` (Lp, Ls) fixes the padded shape (see
    padded_lengths); None: the batch's own, rounded up to a multiple of 8."""
    thinking = stage > 0 or bool(fixed_k)
    slots = fixed_k if fixed_k is not None else stage * thoughts_per_step
    prefixes, suffixes, ks, starts = [], [], [], []
    for ex in examples:
        replaced = len(ex.steps) if fixed_k is not None else min(stage, len(ex.steps))
        prefix = ex.question + ([bot_id] if thinking else [])
        kept = [t for step in ex.steps[replaced:] for t in step]
        suffix = ([eot_id] if thinking else []) + kept
        starts.append(len(suffix))  # where the answer begins in the suffix
        prefixes.append(prefix)
        suffixes.append(suffix + ex.answer)
        ks.append(slots if fixed_k is not None else replaced * thoughts_per_step)
    lp, ls = lengths or (_round_up(max(map(len, prefixes))), _round_up(max(map(len, suffixes))))
    if max(map(len, prefixes)) > lp or max(map(len, suffixes)) > ls:
        raise ValueError(f"make_batch: lengths={lengths} are too short for this batch; use padded_lengths(examples)")
    b = len(examples)
    batch = {"prefix": np.full((b, lp), pad_id, np.int32), "prefix_valid": np.zeros((b, lp), bool),
             "active": np.arange(slots)[None, :] < np.array(ks)[:, None],
             "suffix": np.full((b, ls), pad_id, np.int32), "suffix_valid": np.zeros((b, ls), bool),
             "answer_start": np.array(starts, np.int32)}
    for r, (p, s) in enumerate(zip(prefixes, suffixes)):
        batch["prefix"][r, lp - len(p):], batch["prefix_valid"][r, lp - len(p):] = p, True
        batch["suffix"][r, :len(s)], batch["suffix_valid"][r, :len(s)] = s, True
    j = np.arange(ls)[None, :]
    batch["loss_mask"] = batch["suffix_valid"] & (batch["suffix"] != eot_id)
    batch["answer_mask"] = batch["suffix_valid"] & (j >= batch["answer_start"][:, None])
    return batch


def latent_forward(model: LatentReasoner, batch: dict, noise: jax.Array | None = None, *,
                   inputs: jax.Array | None = None, choose_active: Callable | None = None,
                   layers: bool = False) -> dict:
    """Prefix, thoughts and suffix through one KV cache. Returns a dict: logits (B, Ls, V) where
    logits[:, j] predicts suffix[:, j]; the fed thoughts, their projections `mus` and the steps'
    hidden states (B, S, D); the question state `question` (B, D) (the hidden state at the
    prefix's last token); and with `layers` the residual stream after every block at each
    predictor, (n_layers, B, Ls, D). `noise` / `inputs`: see model/latent.think.
    `choose_active(question)` -> (B, S) replaces batch["active"] once the question state is known
    (the stochastic loop's budget head); the thought slots that ran are returned as `active`."""
    trunk = model.trunk
    prefix, pvalid = batch["prefix"], batch["prefix_valid"]
    suffix, svalid, active = batch["suffix"], batch["suffix_valid"], batch["active"]
    b, lp = prefix.shape
    cache = trunk.empty_cache(b, lp + active.shape[1] + suffix.shape[1])
    ppos = jnp.maximum(jnp.cumsum(pvalid, axis=1) - 1, 0)
    h, cache, pstream = trunk.extend(trunk.embed_tokens(prefix), ppos, pvalid, cache, layers=True)
    question = h[:, -1]
    if choose_active is not None:
        active = choose_active(question)
    block = think(model, question, ppos[:, -1], cache, active, noise, inputs=inputs, layers=layers)
    spos = block["positions"][:, None] + jnp.cumsum(svalid, axis=1)
    hs, _, sstream = trunk.extend(trunk.embed_tokens(suffix), spos, svalid, block["cache"], layers=True)
    predictors = jnp.concatenate([block["h_last"][:, None], hs[:, :-1]], axis=1)
    result = {"logits": trunk.logits(predictors), "thoughts": block["thoughts"], "mus": block["mus"],
              "thought_hidden": block["hidden"], "question": question, "active": active}
    if layers:
        # the stream before the suffix: the last thought's if the row ran one, else the prefix's last token
        before = pstream[:, :, -1]
        if active.shape[1]:
            ran = jnp.any(active, axis=1)
            last = jnp.maximum(jnp.sum(active, axis=1) - 1, 0)
            tstream = block["streams"][:, :, :, 0]  # (S, L, B, D)
            picked = jnp.take_along_axis(tstream, last[None, None, :, None], axis=0)[0]
            before = jnp.where(ran[None, :, None], picked, before)
        result["layers"] = jnp.concatenate([before[:, :, None], sstream[:, :, :-1]], axis=2)
    return result


def token_ce(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross-entropy over the masked positions."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1)


def answer_correct(logits: jax.Array, batch: dict) -> jax.Array:
    """(B,) bool: every answer token is the argmax under teacher forcing (a greedy decode would
    write exactly the answer)."""
    right = (jnp.argmax(logits, axis=-1) == batch["suffix"]) | ~batch["answer_mask"]
    return jnp.all(right, axis=1)


def at_answer(stream: jax.Array, batch: dict) -> jax.Array:
    """(n_layers, B, D): the stream at the predictor of the first answer token."""
    idx = batch["answer_start"][None, :, None, None]
    return jnp.take_along_axis(stream, jnp.broadcast_to(idx, stream.shape[:2] + (1, stream.shape[3])), axis=2)[:, :, 0]


def codi_alignment(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """Mean over layers of |student - sg(teacher)|, each layer divided by the teacher's standard
    deviation at that layer (over the batch and the hidden width): (n_layers, B, D) -> ()."""
    teacher = jax.lax.stop_gradient(teacher)
    std = jnp.std(teacher, axis=(1, 2), keepdims=True) + 1e-6
    return jnp.mean(jnp.abs(student - teacher) / std)


def coconut_loss(model: LatentReasoner, batch: dict) -> tuple[jax.Array, dict]:
    out = latent_forward(model, batch)
    ce = token_ce(out["logits"], batch["suffix"], batch["loss_mask"])
    return ce, {"ce": ce, "answer_acc": jnp.mean(answer_correct(out["logits"], batch))}


def codi_loss(model: LatentReasoner, batch: dict, *, distill: float, teacher_ce: float) -> tuple[jax.Array, dict]:
    """`batch` holds a teacher batch and a student batch of the same examples ("teacher", "student")."""
    t = latent_forward(model, batch["teacher"], layers=True)
    s = latent_forward(model, batch["student"], layers=True)
    t_ce = token_ce(t["logits"], batch["teacher"]["suffix"], batch["teacher"]["loss_mask"])
    s_ce = token_ce(s["logits"], batch["student"]["suffix"], batch["student"]["loss_mask"])
    align = codi_alignment(at_answer(s["layers"], batch["student"]), at_answer(t["layers"], batch["teacher"]))
    loss = s_ce + teacher_ce * t_ce + distill * align
    return loss, {"ce": s_ce, "teacher_ce": t_ce, "align": align,
                  "answer_acc": jnp.mean(answer_correct(s["logits"], batch["student"]))}


def stochastic_loss(model: LatentReasoner, batch: dict, *, reference_graph, sigma: float, step_cost: float,
                    kl_weight: float, verifier_weight: float) -> tuple[jax.Array, dict]:
    """The stochastic latent loop on an all-latent batch (make_batch with fixed_k = K_max):
      1. the budget head samples K per question from the (stop-gradient) question state;
      2. K thoughts z_k = mu_k + sigma * eps_k run (the rest of the K_max slots are skipped);
      3. reward = 1[answer right under teacher forcing] - step_cost * K, advantage against the
         verifier's question-only prediction (a baseline that does not depend on the sample);
      4. loss = answer CE (through the sampled thoughts) + REINFORCE on the trajectory's and the
         budget's log-probability + kl_weight * KL(pi || pi_ref) per step, where pi_ref is the
         frozen reference (batch["reference"], merged with `reference_graph`) scoring the same
         thoughts + verifier_weight * BCE of the verifier on the trajectory and on the question.
    batch["key"] seeds the sampling."""
    from quietreasoning.model import latent_rl as rl

    k_budget, k_eps = jax.random.split(batch["key"])
    k_max = batch["active"].shape[1]
    budget = {}

    def choose_active(question):  # the budget head reads the question state of the loop's own prefix pass
        budget["question"] = jax.lax.stop_gradient(question)
        budget["k"], budget["log_prob"] = model.budget.sample(budget["question"], k_budget)
        return jnp.arange(k_max)[None, :] < budget["k"][:, None]

    eps = jax.random.normal(k_eps, batch["active"].shape + (model.cfg.d_model,))
    out = latent_forward(model, batch, sigma * eps, choose_active=choose_active)
    question, k, budget_logp, active = budget["question"], budget["k"], budget["log_prob"], out["active"]
    run = dict(batch, active=active)
    z = jax.lax.stop_gradient(out["thoughts"])
    ce = token_ce(out["logits"], batch["suffix"], batch["loss_mask"])
    correct = answer_correct(out["logits"], batch)
    reward = rl.latent_reward(correct, k, step_cost)
    q_logit = model.verifier(jnp.zeros_like(z), jnp.zeros_like(active), question)
    baseline = jax.nn.sigmoid(q_logit)
    log_prob = rl.trajectory_log_prob(out["mus"], eps, sigma, active) + budget_logp
    reinforce = rl.reinforce_loss(log_prob, reward, baseline)
    ref = nnx.merge(reference_graph, batch["reference"])
    ref_mus = jax.lax.stop_gradient(latent_forward(ref, run, inputs=z)["mus"])
    kl = jnp.mean(rl.gaussian_kl(out["mus"], sigma, ref_mus, sigma, active))
    t_logit = model.verifier(z, active, question)
    verifier = rl.bce_loss(t_logit, correct) + rl.bce_loss(q_logit, correct)
    loss = ce + reinforce + kl_weight * kl + verifier_weight * verifier
    return loss, {"ce": ce, "answer_acc": jnp.mean(correct), "reward": jnp.mean(reward), "k": jnp.mean(k),
                  "kl": kl, "verifier_bce": verifier,
                  "verifier_ece": rl.expected_calibration_error(jax.nn.sigmoid(t_logit), correct)}


# ----------------------------------------------------------------------------- training loop

def curriculum(examples: Sequence[Encoded], cfg: Config) -> list[int]:
    """Coconut's stages 0..C: C is the most steps an example has, capped so that C * n thoughts fit
    in latent.k_max; the last stage replaces every step of every example it can."""
    most = max(len(ex.steps) for ex in examples)
    return list(range(0, min(most, cfg.latent.k_max // cfg.latent.thoughts_per_step) + 1))


def make_step(graphdef, other, tx, loss_fn: Callable):
    """The jitted update: (params, opt_state, batch) -> (params, opt_state, metrics)."""
    @jax.jit
    def step(params, opt_state, batch):
        def f(p):
            return loss_fn(nnx.merge(graphdef, p, other), batch)
        (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, dict(metrics, loss=loss)
    return step


def train(model: LatentReasoner, examples: Sequence[Encoded], cfg: Config, *, bot_id: int, eot_id: int,
          stage_steps: Sequence[tuple[int, int]], batch_size: int, seed: int = 0,
          on_stage_end: Callable[[int, LatentReasoner], None] | None = None, progress: bool = True) -> list[dict]:
    """Trains `model` in place through `stage_steps` [(stage, steps), ...] with the recipe of
    cfg.latent.recipe (coconut: each stage as its own curriculum stage; codi: every step is a
    teacher + student pair; stochastic: the REINFORCE loop on all-latent batches against the
    model as the call starts; stage ignored by the last two). Returns one metrics dict per logged step."""
    from tqdm import tqdm

    lat = cfg.latent
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    total = sum(s for _, s in stage_steps)
    tx = make_optimizer(dataclasses.replace(cfg.train, steps=total))
    opt_state = tx.init(params)
    reference = None
    if lat.recipe == "codi":
        loss_fn = functools.partial(codi_loss, distill=lat.codi_distill, teacher_ce=lat.codi_teacher_ce)
    elif lat.recipe == "stochastic":
        if model.budget is None:
            raise ValueError("latent.recipe=stochastic needs the budget and verifier heads: build the model "
                             "with LatentReasoner(..., heads=latent.k_max)")
        reference_graph, reference = nnx.split(model)  # frozen: the model as this run starts
        reference = jax.tree.map(jnp.copy, reference)
        loss_fn = functools.partial(stochastic_loss, reference_graph=reference_graph, sigma=lat.sigma,
                                    step_cost=lat.step_cost, kl_weight=lat.kl_weight,
                                    verifier_weight=lat.verifier_weight)
    else:
        loss_fn = coconut_loss
    step_fn = make_step(graphdef, other, tx, loss_fn)
    lengths = padded_lengths(examples)
    rng = np.random.default_rng(seed)
    history = []
    bar = tqdm(total=total, desc=f"latent {lat.recipe}", disable=not progress, unit="step")
    t0 = time.perf_counter()
    done = 0
    for stage, steps in stage_steps:
        for _ in range(steps):
            picked = [examples[i] for i in rng.integers(0, len(examples), batch_size)]
            if lat.recipe == "stochastic":
                batch = dict(make_batch(picked, 0, 1, bot_id, eot_id, fixed_k=lat.k_max, lengths=lengths),
                             key=jax.random.key(seed * 1_000_003 + done), reference=reference)
            elif lat.recipe == "codi":
                batch = {"teacher": make_batch(picked, 0, 1, bot_id, eot_id, lengths=lengths),
                         "student": make_batch(picked, 0, 1, bot_id, eot_id, fixed_k=lat.k_max, lengths=lengths)}
            else:
                batch = make_batch(picked, stage, lat.thoughts_per_step, bot_id, eot_id, lengths=lengths)
            params, opt_state, metrics = step_fn(params, opt_state, batch)
            done += 1
            if done % 10 == 0 or done == total:
                row = {k: float(v) for k, v in metrics.items()}
                row.update(step=done, stage=stage, seconds=time.perf_counter() - t0)
                history.append(row)
                bar.set_postfix(stage=stage, loss=f"{row['loss']:.3f}", acc=f"{row['answer_acc']:.2f}")
            bar.update(1)
        nnx.update(model, params)
        if on_stage_end is not None:
            on_stage_end(stage, model)
    bar.close()
    return history
