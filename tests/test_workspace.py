"""The latent workspace and its losses: causality chunk by chunk, padding and packed documents,
ACT halting, every loss term (finite, >= 0, gradients where they should be), sharding names and
the closed-form parameter count.

Compiling is what costs on CPU, so the model tests share one jitted function over one set of
shapes, `run`: write + one read on a tiny residual stack, every loss term, and the gradient of a
coefficient-weighted sum of the terms (a one-hot coefficient gives one term's gradient). Inputs
are built in numpy and outputs compared in numpy, so no eager JAX op compiles on the side.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import micro_config
from quietreasoning.config import load_config
from quietreasoning.model.workspace import Workspace, act_weights, workspace_param_count
from quietreasoning.training.losses import (answer_targets, infonce_loss, orthogonality_loss, ponder_loss,
                                            workspace_losses)
from quietreasoning.training.sharding import RULES, logical_to_spec

B, T, L, D = 4, 32, 8, 64   # 4 chunks of 8 tokens; D is the micro config's d_model
TERMS = ("ws_next_latent", "ws_sparsity", "ws_orthogonality", "ws_infonce", "ws_ponder")
EXTRA = ("ponder_to", "read")  # ponder loss against a given target; a stand-in LM loss on the read output
N_TERMS = len(TERMS) + len(EXTRA)


def _cfg(*overrides):
    return micro_config("model.workspace=true", "model.n_layers=2", "model.ws_layer=1", "model.ws_read_layers=[1]",
                        f"model.ws_chunk={L}", "model.compute_dtype=float32", *overrides)


@pytest.fixture(scope="module")
def ws_setup():
    cfg = _cfg()
    ws = Workspace(cfg.model, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(ws)

    def objective(params, h, seg, answer_mask, target, coef):
        """A tiny stack: h is the hidden state after block ws_layer - 1; out = h + read(h)."""
        model = nnx.merge(graphdef, params)
        states, aux = model.write(h, seg)
        out = h + model.read(0, h, states, seg)
        total, metrics = workspace_losses(aux, states, cfg.losses, cfg.model, answer_mask=answer_mask,
                                          embeddings=h, segment_ids=seg)
        extra = [ponder_loss(aux["ws_expected_steps"], target, aux["ws_chunk_mask"]), jnp.mean(jnp.square(out))]
        terms = jnp.stack([metrics[k] for k in TERMS] + extra)
        return jnp.dot(coef, terms), {"terms": terms, "states": states, "aux": aux, "out": out,
                                      "total": total, "metrics": metrics}

    grad_fn = jax.jit(jax.value_and_grad(objective, has_aux=True))

    def run(params, h, seg, answer=None, target=2.0, coef=None):
        """-> (outputs, gradients of coef . terms), all numpy."""
        answer = np.zeros((B, T), np.float32) if answer is None else answer
        coef = np.zeros(N_TERMS, np.float32) if coef is None else coef
        (_, outputs), grads = grad_fn(params, h, seg, answer, np.float32(target), coef)
        return jax.device_get(outputs), jax.device_get(grads)

    def forward(params, h, seg):
        o = run(params, h, seg)[0]
        return o["states"], o["aux"], o["out"]

    return cfg, ws, params, forward, run


def _hidden(seed=0):
    return np.random.default_rng(seed).standard_normal((B, T, D)).astype(np.float32)


def _ones():
    return np.ones((B, T), np.int32)


def _answers():
    answer = np.zeros((B, T), np.float32)
    answer[:, 20:26] = 1.0  # answers start in chunk 2: InfoNCE uses states[2]
    return answer


def _same(a, b):
    np.testing.assert_array_equal(a, b)


# 1. causality --------------------------------------------------------------------------------

def test_a_token_changes_nothing_in_its_own_or_earlier_chunks(ws_setup):
    _, _, params, forward, _ = ws_setup
    h = _hidden()
    states, _, out = forward(params, h, _ones())
    for c in (0, 1, 2):
        p = c * L + 3                                   # a token inside chunk c
        h2 = h.copy()
        h2[:, p] += 1.0
        states2, _, out2 = forward(params, h2, _ones())
        _same(states2[:, :c + 1], states[:, :c + 1])    # what chunks <= c read is unchanged
        keep = np.arange((c + 1) * L) != p              # every other token of chunks <= c, exactly
        _same(out2[:, :(c + 1) * L][:, keep], out[:, :(c + 1) * L][:, keep])
        assert not np.allclose(out2[:, (c + 1) * L:], out[:, (c + 1) * L:])  # later chunks read it
        assert not np.allclose(states2[:, c + 1:], states[:, c + 1:])


def test_changing_the_future_leaves_the_past_unchanged(ws_setup):
    _, _, params, forward, _ = ws_setup
    h, other = _hidden(), _hidden(1)
    _, _, out = forward(params, h, _ones())
    for t in (5, 8, 19):                                # mid-chunk and at a chunk boundary
        h2 = h.copy()
        h2[:, t:] = other[:, t:]
        _, _, out2 = forward(params, h2, _ones())
        _same(out2[:, :t], out[:, :t])
        assert not np.allclose(out2[:, t:], out[:, t:])


# 2. initial state, padding, packed documents -------------------------------------------------

def test_every_row_starts_from_the_learned_init(ws_setup):
    _, ws, params, forward, _ = ws_setup
    states, _, _ = forward(params, _hidden(), _ones())
    init = np.asarray(ws.slots_init[...])
    for b in range(B):
        _same(states[b, 0], init)


def test_padding_does_not_write(ws_setup):
    _, _, params, forward, _ = ws_setup
    h, seg = _hidden(), _ones()
    seg[0, 20:] = 0
    seg[1, 24:] = 0                                     # row 1 ends with a whole padding chunk
    pad = seg == 0
    states, aux, out = forward(params, h, seg)
    h2 = np.where(pad[..., None], _hidden(2) * 100.0, h)
    states2, aux2, out2 = forward(params, h2, seg)
    _same(states2, states)
    for key in aux:
        _same(aux2[key], aux[key])
    _same(out2[~pad], out[~pad])
    assert np.isfinite(out2).all()
    _same(aux["ws_chunk_mask"][1], [1, 1, 1, 0])


def test_packed_documents_do_not_see_each_other(ws_setup):
    _, _, params, forward, _ = ws_setup
    h = _hidden()
    seg = np.asarray([[1] * 12 + [2] * 20] * B, np.int32)  # doc 2 starts in the middle of chunk 1
    _, _, out = forward(params, h, seg)
    h2 = h.copy()
    h2[:, :12] = _hidden(3)[:, :12]                     # another doc 1
    _, _, out2 = forward(params, h2, seg)
    _same(out2[:, 12:], out[:, 12:])
    # as one document, chunk 1 reads what chunk 0 wrote: doc 1's tokens there still do, doc 2's do not
    _, _, single = forward(params, h, _ones())
    _same(out[:, :12], single[:, :12])
    assert not np.allclose(out[:, 12:16], single[:, 12:16])


# 3. halting ------------------------------------------------------------------------------------

def test_act_weights_sum_to_one_and_steps_stay_in_range():
    p = np.random.default_rng(0).uniform(size=(200, 3)).astype(np.float32)
    p = np.concatenate([p, np.zeros((1, 3)), np.ones((1, 3)), [[0.5, 0.6, 0.9]]]).astype(np.float32)
    w = np.asarray(jax.jit(act_weights)(p))
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    assert (w >= 0).all()
    steps = (w * np.arange(1, 4)).sum(-1)
    assert (steps >= 1 - 1e-6).all() and (steps <= 3 + 1e-6).all()
    assert steps[-3] == pytest.approx(3.0) and steps[-2] == pytest.approx(1.0)
    np.testing.assert_allclose(w[-1], [0.5, 0.5, 0.0], rtol=1e-6)  # the remainder goes to the halting step


def test_halting_starts_near_target_and_the_ponder_loss_moves_it(ws_setup):
    cfg, _, params, forward, run = ws_setup
    h = _hidden()
    _, aux, _ = forward(params, h, _ones())
    steps = aux["ws_expected_steps"]
    assert (steps >= 1).all() and (steps <= cfg.model.ws_max_steps).all()
    assert abs(steps.mean() - cfg.model.ws_halt_target) < 0.15
    coef = np.eye(N_TERMS, dtype=np.float32)[len(TERMS)]  # ponder_to only
    for target in (2.0, 1.0):
        p, losses = params, []
        for _ in range(3):
            out, g = run(p, h, _ones(), target=target, coef=coef)
            losses.append(float(out["terms"][len(TERMS)]))
            # SGD on the halting unit only
            p = jax.tree.map_with_path(lambda path, x, d: x - 0.02 * d if "halt" in jax.tree_util.keystr(path) else x,
                                       jax.device_get(p), g)
        assert losses[2] < losses[1] < losses[0], (target, losses)


# 4. loss terms ----------------------------------------------------------------------------------

def _grad_norms(g) -> dict[str, float]:
    flat = jax.tree_util.tree_flatten_with_path(g)[0]
    return {jax.tree_util.keystr(path): float(np.linalg.norm(x)) for path, x in flat}


def _norm_of(norms, *parts):
    return sum(v for k, v in norms.items() if all(p in k for p in parts))


def test_each_loss_term_is_finite_nonnegative_and_trains_its_parameters(ws_setup):
    _, _, params, _, run = ws_setup
    h = _hidden()
    # what each term must train; the read gets no gradient from the auxiliary terms, only from
    # the LM loss (here a stand-in on the stack's output), which also trains the write through the state
    expect = {
        "ws_next_latent": [("pred_in",), ("pred_out",), ("w_q",), ("grn_value",)],
        "ws_sparsity": [("w_q",), ("w_k",), ("slots_init",)],
        "ws_orthogonality": [("slots_init",), ("grn_value",)],
        "ws_infonce": [("answer_proj",), ("grn_value",), ("w_v",)],
        "ws_ponder": [("halt_b",), ("halt_w",)],
        "read": [("reads", "w_o"), ("reads", "w_q"), ("grn_value",), ("slots_init",)],
    }
    for i, name in enumerate(TERMS + EXTRA):
        out, g = run(params, h, _ones(), _answers(), 2.0, np.eye(N_TERMS, dtype=np.float32)[i])
        value = float(out["terms"][i])
        assert np.isfinite(value) and value >= 0, (name, value)
        norms = _grad_norms(g)
        assert all(np.isfinite(v) for v in norms.values()), name
        for parts in expect.get(name, []):
            assert _norm_of(norms, *parts) > 0, (name, parts)
        if name in TERMS:
            assert _norm_of(norms, "reads") == 0, name
    assert float(out["metrics"]["ws_infonce"]) > 0


def test_workspace_losses_sum_the_weighted_terms(ws_setup):
    cfg, _, params, _, run = ws_setup
    out, _ = run(params, _hidden(), _ones(), _answers())
    metrics, w = out["metrics"], cfg.losses
    assert float(metrics["ws_infonce_rows"]) == B
    weighted = sum(getattr(w, k) * float(metrics[k]) for k in TERMS)
    np.testing.assert_allclose(float(out["total"]), weighted, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["ws_total"]), weighted, rtol=1e-6)
    halting = float(out["aux"]["ws_expected_steps"].mean())
    np.testing.assert_allclose(float(metrics["ws_halting_avg"]), halting, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["ws_ponder"]), (halting - cfg.model.ws_halt_target) ** 2, rtol=1e-4)


def test_orthogonality_is_zero_for_orthonormal_slots():
    orthogonality = jax.jit(orthogonality_loss)
    eye = np.broadcast_to(np.eye(8, 64, dtype=np.float32) * 3.0, (2, 3, 8, 64))  # orthogonal rows, any length
    assert float(orthogonality(eye)) == pytest.approx(0.0, abs=1e-7)
    noise = np.random.default_rng(0).standard_normal((2, 3, 8, 64)).astype(np.float32)
    assert float(orthogonality(noise)) > 0


def test_infonce_needs_two_answers_and_prefers_matched_pairs():
    infonce = jax.jit(infonce_loss)
    rng = np.random.default_rng(0)
    answers = rng.standard_normal((6, 32)).astype(np.float32)
    summary = answers + 0.3 * rng.standard_normal((6, 32)).astype(np.float32)
    none, one, every = np.zeros(6, bool), np.eye(6, dtype=bool)[2], np.ones(6, bool)
    assert float(infonce(summary, answers, none)) == 0.0
    assert float(infonce(summary, answers, one)) == 0.0
    matched = float(infonce(summary, answers, every))
    shuffled = float(infonce(summary, answers[[1, 2, 3, 4, 5, 0]], every))
    assert 0 <= matched < shuffled
    # rows without answers are neither queries nor negatives
    some = np.arange(6) < 4
    other = summary.copy()
    other[4:] = rng.standard_normal((2, 32))
    assert float(infonce(summary, answers, some)) == pytest.approx(float(infonce(other, answers, some)))


def test_answer_targets_pick_the_chunk_before_the_answer():
    targets = jax.jit(answer_targets, static_argnums=2)
    emb = np.random.default_rng(0).standard_normal((3, T, 16)).astype(np.float32)
    mask = np.zeros((3, T), np.float32)
    mask[0, 18:22] = 1                                  # row 0: answer in chunk 2
    mask[1, 2:5] = 1                                    # row 1: in chunk 0, whose state is the shared init
    answer, chunk, has = targets(mask, emb, L)          # row 2: no answer
    _same(np.asarray(chunk[:2]), [2, 0])
    _same(np.asarray(has), [True, False, False])
    np.testing.assert_allclose(np.asarray(answer[0]), emb[0, 18:22].mean(0), rtol=1e-5, atol=1e-6)
    # with packed documents, states[c_a] must belong to the answer's document
    seg = np.ones((3, T), np.int32)
    seg[0, 17:] = 2                                     # row 0's answer document starts at 17, in chunk 2
    _, _, has = targets(mask, emb, L, seg)
    assert not bool(has[0])


# 5. names and the parameter count ---------------------------------------------------------------

def test_every_parameter_is_named_by_the_rules_and_counted_in_closed_form(ws_setup):
    cfg, ws, _, _, _ = ws_setup
    count = 0
    for path, var in nnx.iter_graph(ws):
        if isinstance(var, nnx.Param):
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == var[...].ndim, path
            assert all(n in RULES for n in names), (path, names)
            logical_to_spec(tuple(names))  # raises when two names map to one mesh axis
            count += var[...].size
    assert count == workspace_param_count(cfg.model)
    assert workspace_param_count(micro_config().model) == 0  # off: nothing built


def test_3b_workspace_count_from_eval_shape():
    m = load_config("3b").model
    abstract = nnx.eval_shape(lambda: Workspace(m, rngs=nnx.Rngs(0)))
    counted = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert counted == workspace_param_count(m)
    assert 2e7 < counted < 1e8  # tens of millions next to the 2B trunk
