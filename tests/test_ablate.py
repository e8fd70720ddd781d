"""The prefix-cached, batched ablation engine computes exactly what the naive way computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from gguf_prune.scoring import ablate, greedy, naive, oneshot
from gguf_prune.calibration import load_calibration
from gguf_prune.models.cuts import apply_plan, load_model
from gguf_prune.plan import LayerPlan, ModelShape, Plan

TOL = 1e-5  # float32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The fixture models are tiny: intra-op threads only add contention on a shared machine (2-4x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _groups(hf_dir, n_seq=3, seq_len=20, pad=True):
    """Calibration micro-batches; with ``pad`` the last sequences are right-padded like chat data."""
    tok = AutoTokenizer.from_pretrained(hf_dir)
    cal = load_calibration(None, tok, seq_len=seq_len, samples=n_seq, seed=5)
    ids, mask = cal.input_ids.clone(), cal.attention_mask.clone()
    if pad:
        mask[1, seq_len - 6:] = False
        mask[2, seq_len // 2:] = False
        ids[~mask] = tok.pad_token_id
    return [(ids[:2], mask[:2]), (ids[2:], mask[2:])]


@pytest.fixture(scope="module")
def tied(tiny_tied):
    return load_model(tiny_tied)


@pytest.fixture(scope="module")
def groups(tiny_tied):
    return _groups(tiny_tied)


def _scan(model, groups, spec, batch_tokens=64):
    eng = ablate.Engine(model, batch_tokens=batch_tokens)
    refs = [eng.reference(i, m) for i, m in groups]
    return eng, refs, oneshot.scan(eng, groups, refs, spec)


def test_fast_equals_naive_for_layers_sublayers_heads_and_kv_groups(tied, groups):
    L, nh, nkv = 6, 8, 2
    # batch_tokens=64: variants are stacked two or three at a time and chunked, on padded batches
    eng, refs, r = _scan(tied, groups, ablate.ScanSpec(sublayers=True, head_layers=(4,)))
    units = ([[("layer", i)] for i in range(L)] + [[("attn", i)] for i in range(L)] + [[("mlp", i)] for i in range(L)]
             + [[("heads", 4, (q,))] for q in range(nh)]
             + [[("heads", 4, tuple(range(g * 4, g * 4 + 4)))] for g in range(nkv)])
    kl, nll, n_real, n_tgt = naive.naive_divergence(tied, groups, units)
    assert (n_real, n_tgt) == (r.n_real, r.n_tgt) == (20 + 14 + 10, 19 + 13 + 9)
    fast = np.concatenate([r.kl, r.attn_kl, r.mlp_kl, r.head_kl[4], r.kv_kl[4]]) / n_real
    assert np.abs(fast - kl).max() <= TOL, np.abs(fast - kl).max()
    assert np.abs(r.nll[:L] / n_tgt - nll[:L]).max() <= TOL
    # the scores are not degenerate: every unit matters, by different amounts
    assert kl.min() > 1e-4 and kl.max() / kl.min() > 10
    assert abs(r.base_kl) / n_real < 1e-6  # the model as loaded is the reference


def test_stack_size_does_not_change_the_result(tied, groups):
    spec = ablate.ScanSpec(sublayers=True, head_layers=(2,))
    _, _, one = _scan(tied, groups[:1], spec, batch_tokens=1)  # one variant per forward
    _, _, big = _scan(tied, groups[:1], spec, batch_tokens=10_000)  # every variant of a layer in one batch
    for a, b in ((one.kl, big.kl), (one.attn_kl, big.attn_kl), (one.head_kl[2], big.head_kl[2]),
                 (one.kv_kl[2], big.kv_kl[2])):
        assert np.abs(a - b).max() / one.n_real <= TOL


def test_fast_path_costs_half_the_layer_evaluations(tied, groups):
    eng = ablate.Engine(tied)
    refs = [eng.reference(i, m) for i, m in groups]
    after_ref = eng.seq_layer_evals
    n_seq, L = 3, 6
    assert after_ref == n_seq * L
    oneshot.scan(eng, groups, refs, ablate.ScanSpec(sublayers=False))
    # the carried walk (L) + each layer's bypass variant running layers i+1… (L·(L−1)/2), per sequence
    assert eng.seq_layer_evals - after_ref == n_seq * (L + L * (L - 1) // 2)


def test_greedy_steps_match_naive_removal_of_the_chosen_units(tied, groups):
    eng = ablate.Engine(tied, batch_tokens=64)
    refs = [eng.reference(i, m) for i, m in groups]
    n_real = sum(r.n_real for r in refs)
    scan = oneshot.scan(eng, groups, refs, ablate.ScanSpec(sublayers=True))

    def cands(modes):
        for pos in range(1, 5):
            if modes[pos] == "full":
                yield ("layer", pos)
                yield ("attn", pos)
                yield ("mlp", pos)
            elif modes[pos] != "layer":
                yield ("mlp" if modes[pos] == "attn" else "attn", pos)

    steps = greedy.greedy(eng, groups, refs, 2, cands, lambda k, p, m: 1)
    assert [s.candidates for s in steps][0] == 12
    # step 1 is the cheapest single unit
    singles = {("layer", i): scan.kl[i] for i in range(1, 5)} | {("attn", i): scan.attn_kl[i] for i in range(1, 5)} \
        | {("mlp", i): scan.mlp_kl[i] for i in range(1, 5)}
    first = min(singles, key=singles.get)
    assert (steps[0].kind, steps[0].pos) == first
    assert abs(steps[0].kl - singles[first] / n_real) <= TOL
    # every step's KL is the naive KL of removing all the chosen units together
    chosen = [(s.kind, s.pos) for s in steps]
    kl, _, _, _ = naive.naive_divergence(tied, groups, [chosen[:1], chosen[:2]])
    assert np.abs(np.array([s.kl for s in steps]) - kl).max() <= TOL
    assert abs(steps[1].delta_kl - (kl[1] - kl[0])) <= TOL
    assert kl[1] > kl[0] > 0 and steps[1].candidates in (10, 11)


def test_fast_equals_naive_on_a_pruned_model_against_the_unpruned_reference(tiny_tied, groups):
    original = load_model(tiny_tied)
    pruned = load_model(tiny_tied)
    shape = ModelShape.from_hf_dir(tiny_tied)
    plan = Plan.identity(shape).with_layer(LayerPlan(2, removed=True)) \
        .with_layer(LayerPlan(3, heads=(0, 1, 4, 5), neurons=None)) \
        .with_layer(LayerPlan(4, heads=(), neurons=tuple(range(0, 768, 2))))
    eng0 = ablate.Engine(original, batch_tokens=64)
    refs = [eng0.reference(i, m) for i, m in groups]  # the unpruned model
    apply_plan(pruned, plan)
    eng = ablate.Engine(pruned, batch_tokens=64)
    # positions after removing layer 2: 0 1 | 3→2 | 4→3 | 5→4
    r = oneshot.scan(eng, groups, refs, ablate.ScanSpec(sublayers=True, head_layers=(2,),
                                                       removed_heads={2: {2, 3, 6, 7}}, neurons=True))
    units = [[], [("layer", 1)], [("mlp", 3)], [("heads", 2, (0,))], [("heads", 2, (4, 5))]]
    kl, _, n_real, _ = naive.naive_divergence(pruned, groups, units, reference_model=original)
    assert abs(r.base_kl / n_real - kl[0]) <= TOL and kl[0] > 1e-3
    assert abs(r.kl[1] / n_real - kl[1]) <= TOL
    assert abs(r.mlp_kl[3] / n_real - kl[2]) <= TOL
    assert np.isnan(r.attn_kl[3])  # attention already removed by the plan
    assert abs(r.head_kl[2][0] / n_real - kl[3]) <= TOL
    assert abs(r.kv_kl[2][1] / n_real - kl[4]) <= TOL
    assert np.isnan(r.head_kl[2][[2, 3, 6, 7]]).all() and np.isfinite(r.head_kl[2][[0, 1, 4, 5]]).all()
    assert 3 not in r.head_kl and set(r.ff_count) == {0, 1, 2, 3, 4}


def test_neuron_statistics_count_real_tokens_only(tied, groups):
    eng, refs, r = _scan(tied, groups, ablate.ScanSpec(sublayers=False, neurons=True, tau=0.05))
    # recompute layer 3's act(gate)·up on real tokens with a plain forward hook
    acts = []
    hk = tied.model.layers[3].mlp.down_proj.register_forward_pre_hook(lambda m, a: acts.append(a[0]))
    with torch.no_grad():
        for ids, mask in groups:
            tied(input_ids=ids, attention_mask=mask.long())
    hk.remove()
    a = torch.cat([x[m] for x, (_, m) in zip(acts, groups)]).abs()  # (n_real, n_ff)
    assert a.shape[0] == r.n_real == 44
    np.testing.assert_allclose(r.ff_count[3], (a > 0.05).sum(0).numpy(), atol=2)
    np.testing.assert_allclose(r.ff_abs[3] / r.n_real, a.mean(0).numpy(), rtol=1e-4, atol=1e-6)
    assert 0 < (r.ff_count[3] / r.n_real).mean() < 1


def test_untied_head_and_unpadded_batches(tiny_untied):
    model = load_model(tiny_untied)
    groups = _groups(tiny_untied, pad=False)
    eng, refs, r = _scan(model, groups, ablate.ScanSpec(sublayers=False))
    kl, nll, n_real, n_tgt = naive.naive_divergence(model, groups, [[("layer", i)] for i in range(4)])
    assert np.abs(r.kl / n_real - kl).max() <= TOL
    assert np.abs(r.nll / n_tgt - nll).max() <= TOL


def test_lazy_greedy_measures_fewer_candidates_and_stays_exact_in_what_it_reports(tied, groups):
    eng = ablate.Engine(tied, batch_tokens=64)
    refs = [eng.reference(i, m) for i, m in groups]

    def cands(modes):
        for pos in range(1, 5):
            if modes[pos] == "full":
                yield ("attn", pos)
                yield ("mlp", pos)
            elif modes[pos] in ("attn", "mlp"):
                yield ("mlp" if modes[pos] == "attn" else "attn", pos)

    exact = greedy.greedy(eng, groups, refs, 3, cands, lambda k, p, m: 1)
    wide = greedy.greedy(eng, groups, refs, 3, cands, lambda k, p, m: 1, pool=100)
    assert [(s.kind, s.pos) for s in wide] == [(s.kind, s.pos) for s in exact]  # a pool ≥ all = exact greedy
    lazy = greedy.greedy(eng, groups, refs, 3, cands, lambda k, p, m: 1, pool=2)
    assert lazy[0].candidates == 8 and lazy[1].candidates == 2 and lazy[2].candidates == 2
    assert (lazy[0].kind, lazy[0].pos) == (exact[0].kind, exact[0].pos)
    # whatever it picks, the KL it reports is the true KL of removing those units together
    chosen = [(s.kind, s.pos) for s in lazy]
    kl, _, _, _ = naive.naive_divergence(tied, groups, [chosen[:k] for k in (1, 2, 3)])
    assert np.abs(np.array([s.kl for s in lazy]) - kl).max() <= TOL


def test_lazy_greedy_seeded_by_the_scan_measures_only_the_pool(tied, groups):
    eng = ablate.Engine(tied, batch_tokens=64)
    refs = [eng.reference(i, m) for i, m in groups]
    n_real = sum(r.n_real for r in refs)
    scan = oneshot.scan(eng, groups, refs, ablate.ScanSpec(sublayers=True))

    def cands(modes):
        for pos in range(1, 5):
            if modes[pos] == "full":
                yield ("attn", pos)
                yield ("mlp", pos)

    initial = {(k, p): float(arr[p]) / n_real for p in range(1, 5)
               for k, arr in (("attn", scan.attn_kl), ("mlp", scan.mlp_kl))}
    exact = greedy.greedy(eng, groups, refs, 1, cands, lambda k, p, m: 1)
    seeded = greedy.greedy(eng, groups, refs, 1, cands, lambda k, p, m: 1, pool=3, initial=initial)
    assert seeded[0].candidates == 3  # only the pool was measured in step 1
    assert (seeded[0].kind, seeded[0].pos) == (exact[0].kind, exact[0].pos)
    assert abs(seeded[0].kl - exact[0].kl) <= TOL
