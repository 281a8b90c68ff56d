"""The per-claim verdicts follow their stated rules on records with a known answer."""

from __future__ import annotations

from dashboards.claims import claims


def _rec(arm, depth, seed, acc, ratio=1.0, erank=0.5, penult=10.0, lr=0.1, **cfg):
    config = {"depth": depth, "batchnorm": False, "lr": lr, "projection": "epoch:1", "flat1d_init": "shared", **cfg}
    return {"arm": arm, "seed": seed, "config": config, "status": "finished" if acc is not None else "diverged",
            "val_acc": acc, "test_acc": acc, "gradflow": {"epoch1": {"out.ratio": ratio}},
            "lowrank": {"mean.entropy_frac": erank, "penultimate.energy99": penult}}


def _study(flat_acc_deep, rank1_ratio=1.0, flat_ratio=1e-6, rank1_penult=5.0):
    out = []
    for depth in (4, 16):
        for seed in range(3):
            noise = 0.01 * seed
            out.append(_rec("rank1", depth, seed, 0.9 + noise, ratio=rank1_ratio, penult=rank1_penult))
            acc = flat_acc_deep if depth == 16 else 0.9
            out.append(_rec("flat1d", depth, seed, None if acc is None else acc + noise, ratio=flat_ratio))
            out.append(_rec("dense", depth, seed, 0.95 + noise, penult=10.0))
    return out


def test_trainability_holds_only_where_flat1d_fails_and_rank1_trains():
    c = claims(_study(flat_acc_deep=None), ["depth"], [])  # flat1d diverges at depth 16: scored as chance
    assert c["verdicts"]["trainability"].startswith("Holds only for flat1d at depth 16: there the consecutive")
    c = claims(_study(flat_acc_deep=0.85), ["depth"], [])
    assert c["verdicts"]["trainability"].startswith("Does not hold here")


def test_gradient_flow_and_low_rank_verdicts():
    c = claims(_study(flat_acc_deep=0.85), ["depth"], [])
    assert c["verdicts"]["gradient_flow"].startswith("Holds: after epoch 1, rank1's gradient flow is better than "
                                                     "flat1d's in 2 of 2 cells")
    assert c["verdicts"]["low_rank"].startswith("Holds: the final (penultimate) features")
    c = claims(_study(flat_acc_deep=0.85, rank1_ratio=1e-6, flat_ratio=1.0, rank1_penult=20.0), ["depth"], [])
    assert c["verdicts"]["gradient_flow"].startswith("Does not hold") and c["verdicts"]["low_rank"].startswith(
        "Does not hold")


def test_fast_inference_from_the_champion():
    champ = {"arm": "rank1", "metrics": {"rank1.speedup_b1": 1.5, "rank1.speedup_b32": 0.8, "rank1.flop_ratio": 8.0,
                                         "rank1.fraction_of_flop_ratio_b1": 0.19, "rank1.threads": 1.0}}
    c = claims(_study(flat_acc_deep=0.85), ["depth"], [], champion=champ)
    assert c["verdicts"]["fast_inference"].startswith("Holds only at some batch sizes: the champion's deployed")
    assert "1.50x its dense form at batch 1" in c["verdicts"]["fast_inference"] and "| 32 |" in c["speed_markdown"]
