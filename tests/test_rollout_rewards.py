"""Rewards: SQuAD normalization, EM and F1 against hand-computed values, the main and sub rewards of a group
(parts included), equivalence with the paper code's rule, pluggable scorers and config validation."""
import itertools

import numpy as np
import pytest

from mgrpo_jax.rollout import rewards as R


@pytest.mark.parametrize("raw, norm", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an  Apple,  a day ", "apple day"),
    ("Theatre of the Absurd", "theatre of absurd"),  # "the" only as a whole word
    ("U.S.A.", "usa"),
    ("1,820", "1820"),
    ("", ""),
])
def test_normalize_answer(raw, norm):
    assert R.normalize_answer(raw) == norm


def test_exact_match_and_f1_hand_computed():
    assert R.exact_match("the Velmor Guild.", "Velmor guild") == 1.0
    assert R.exact_match("Velmor", "Velmor Guild") == 0.0
    assert R.exact_match("NYC", ["New York City", "nyc"]) == 1.0  # any alias
    assert R.exact_match(None, "x") == 0.0
    # pred {velmor, guild, hall} vs gold {velmor, guild}: P = 2/3, R = 1, F1 = 0.8
    assert R.f1("Velmor Guild hall", "the Velmor Guild") == pytest.approx(0.8)
    # repeated tokens count with multiplicity: pred [a1, a1] vs gold [a1]: P = 1/2, R = 1, F1 = 2/3
    assert R.f1("a1 a1", "a1") == pytest.approx(2 / 3)
    assert R.f1("nothing shared", "Velmor") == 0.0 and R.f1("", "Velmor") == 0.0 and R.f1(None, "x") == 0.0
    assert R.f1("Velmor", ["Velmor Guild", "Velmor"]) == 1.0  # best alias
    with pytest.raises(ValueError, match="empty after normalization"):
        R.exact_match("x", "The")
    with pytest.raises(ValueError, match="non-empty sequence"):
        R.f1("x", [])


def test_default_main_rewards_and_parts():
    out = R.main_rewards(["Velmor", "wrong", "velmor", None], [True, True, False, True], "Velmor")
    np.testing.assert_array_equal(out.format_ok, [True, True, False, True])
    np.testing.assert_allclose(out.format, [0.1, 0.1, 0.0, 0.1], rtol=1e-6)
    np.testing.assert_allclose(out.correct_score, [1, 0, 0, 0])  # a right answer in a broken format scores 0
    np.testing.assert_allclose(out.correct, [0.9, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(out.reward, [1.0, 0.1, 0.0, 0.1], rtol=1e-6)
    assert out.reward.dtype == np.float32 and out.reward.shape == (4,)
    assert out.means()["format_ok"] == 0.75 and out.means()["reward"] == pytest.approx(0.3, rel=1e-6)


def test_weighted_f1_rewards_hand_computed():
    cfg = R.RewardConfig(alpha_f=0.2, alpha_c=0.5, beta_f=0.3, beta_m=0.4, correct="f1")
    main = R.main_rewards(["Velmor Guild hall", "x"], [True, True], "Velmor Guild", cfg)
    # F1 0.8 -> 0.2 + 0.5 * 0.8 = 0.6; F1 0 -> 0.2
    np.testing.assert_allclose(main.reward, [0.6, 0.2], rtol=1e-6)
    sub = R.sub_rewards([[True, False], [True]], main.correct_score.tolist(), cfg)
    # rollout 0: ok -> 0.3 + 0.4 * 0.8 = 0.62, broken -> 0; rollout 1: ok -> 0.3 + 0 = 0.3
    np.testing.assert_allclose(sub.reward, [0.62, 0.0, 0.3], rtol=1e-6)
    np.testing.assert_allclose(sub.shared, [0.32, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(sub.rollout, [0, 0, 1])
    np.testing.assert_array_equal(sub.call, [0, 1, 0])


def test_paper_code_equivalence():
    """Defaults reproduce the paper code: R_M = 0 | 0.1 | 1.0 and R_S = 0 if bad format else max(0.1, R_M)."""
    gold = "Quessa"
    for main_ok, main_right, sub_ok in itertools.product([False, True], repeat=3):
        answer = "quessa" if main_right else "Velmor"
        main, sub = R.group_rewards([answer], [main_ok], gold, [[sub_ok]])
        paper_rm = 0.0 if not main_ok else (1.0 if main_right else 0.1)
        paper_rs = 0.0 if not sub_ok else max(0.1, paper_rm)
        assert main.reward[0] == np.float32(paper_rm), (main_ok, main_right, sub_ok)
        assert sub.reward[0] == np.float32(paper_rs), (main_ok, main_right, sub_ok)


def test_sub_rewards_ragged_group_with_empty_rollouts():
    main, sub = R.group_rewards(["a1", "b2", "a1"], [True, True, False], "a1", [[True, True, False], [], [True]])
    assert sub.num_rollouts == 3 and sub.reward.shape == (4,)
    parts = sub.per_rollout()
    assert [p.tolist() for p in parts] == [
        [pytest.approx(1.0), pytest.approx(1.0), 0.0], [], [pytest.approx(0.1)]]
    assert sub.per_rollout("format_ok")[0].tolist() == [True, True, False]
    empty = R.sub_rewards([[], []], [1.0, 0.0])
    assert empty.reward.shape == (0,) and [p.size for p in empty.per_rollout()] == [0, 0]
    assert empty.means()["reward"] == 0.0


def test_pluggable_correct_and_judge():
    calls = []

    def lenient(pred, golds):
        calls.append((pred, golds))
        return 0.5 if golds[0].lower() in pred.lower() else 0.0

    judge_seen = []

    def judge(traj):
        judge_seen.append(traj)
        return traj["quality"]

    cfg = R.RewardConfig(correct=lenient, beta_f=0.1, beta_m=0.5, beta_j=0.4, sub_judge=judge)
    main = R.main_rewards(["it is Quessa", "no idea"], [True, True], ["Quessa", "Q"], cfg)
    assert calls[0] == ("it is Quessa", ("Quessa", "Q"))
    np.testing.assert_allclose(main.reward, [0.1 + 0.9 * 0.5, 0.1], rtol=1e-6)
    trajs = [[{"quality": 1.0}, {"quality": 0.25}], [{"quality": 0.5}]]
    sub = R.sub_rewards([[True, False], [True]], main.correct_score.tolist(), cfg, trajs)
    # The judge is not run on the broken trajectory, which scores 0 anyway.
    assert judge_seen == [{"quality": 1.0}, {"quality": 0.5}]
    np.testing.assert_allclose(sub.judge_score, [1.0, 0.0, 0.5])
    np.testing.assert_allclose(sub.judge, [0.4, 0.0, 0.2], rtol=1e-6)
    np.testing.assert_allclose(sub.reward, [0.1 + 0.25 + 0.4, 0.0, 0.1 + 0.0 + 0.2], rtol=1e-6)
    np.testing.assert_allclose(sub.reward, sub.format + sub.shared + sub.judge, rtol=1e-6)
    # A judge with weight 0 is still reported, but does not move the reward.
    watch = R.RewardConfig(sub_judge=judge)
    sub = R.sub_rewards([[True]], [1.0], watch, [[{"quality": 0.3}]])
    assert sub.judge_score[0] == np.float32(0.3) and sub.reward[0] == np.float32(1.0)


def test_main_judge_adds_the_main_agent_s_own_term_and_is_not_shared():
    seen = []

    def judge(main, subs):
        seen.append((main, list(subs)))
        return main["progress"]

    cfg = R.RewardConfig(alpha_j=0.5, main_judge=judge)
    mains = [{"progress": 1.0}, {"progress": 0.25}, {"progress": 0.75}]
    subs = [[{"call": 0}], [], [{"call": 0}, {"call": 1}]]
    main, sub = R.group_rewards(["x", "y", "x"], [True, True, False], "x", [[True], [], [True, True]], cfg,
                                sub_trajectories=subs, main_trajectories=mains)
    assert seen == [(mains[0], subs[0]), (mains[1], subs[1])]  # not run on the broken rollout
    np.testing.assert_allclose(main.judge_score, [1.0, 0.25, 0.0])
    np.testing.assert_allclose(main.reward, [0.1 + 0.9 + 0.5, 0.1 + 0.125, 0.0], rtol=1e-6)
    np.testing.assert_allclose(main.reward, main.format + main.correct + main.judge, rtol=1e-6)
    np.testing.assert_allclose(sub.shared, [0.9, 0.0, 0.0], rtol=1e-6)  # c_k only: the judge is not shared
    with pytest.raises(ValueError, match="pass main_trajectories and sub_trajectories"):
        R.group_rewards(["x"], [True], "x", [[]], cfg)
    with pytest.raises(ValueError, match="one .main trajectory, sub trajectories. pair per rollout"):
        R.main_rewards(["x", "y"], [True, True], "x", cfg, [(mains[0], [])])
    with pytest.raises(ValueError, match="main_judge must return"):
        R.main_rewards(["x"], [True], "x", R.RewardConfig(main_judge=lambda m, s: 1.5), [(mains[0], [])])
    with pytest.raises(ValueError, match="alpha_j=0.5 needs a main_judge"):
        R.RewardConfig(alpha_j=0.5)


def test_bad_scorer_outputs_are_errors():
    with pytest.raises(ValueError, match=r"RewardConfig.correct must return a number in \[0, 1\]"):
        R.main_rewards(["x"], [True], "x", R.RewardConfig(correct=lambda p, g: 2.0))
    cfg = R.RewardConfig(beta_j=1.0, sub_judge=lambda t: float("nan"))
    with pytest.raises(ValueError, match="sub_judge must return"):
        R.sub_rewards([[True]], [1.0], cfg, [["t"]])
    with pytest.raises(ValueError, match="pass the sub trajectories"):
        R.sub_rewards([[True]], [1.0], cfg)
    with pytest.raises(ValueError, match="shaped like format_ok"):
        R.sub_rewards([[True]], [1.0], cfg, [["t", "u"]])


def test_config_and_input_validation():
    with pytest.raises(ValueError, match=r"correct='exact' is not supported; choose one of \['em', 'f1'\]"):
        R.RewardConfig(correct="exact")
    with pytest.raises(ValueError, match="alpha_f must be a finite number >= 0"):
        R.RewardConfig(alpha_f=-0.1)
    with pytest.raises(ValueError, match="beta_m"):
        R.RewardConfig(beta_m=float("inf"))
    with pytest.raises(ValueError, match="beta_j=0.5 needs a sub_judge"):
        R.RewardConfig(beta_j=0.5)
    with pytest.raises(ValueError, match="one per rollout"):
        R.main_rewards(["a", "b"], [True], "a")
    with pytest.raises(ValueError, match="must hold bools"):
        R.main_rewards(["a"], [1], "a")
    with pytest.raises(ValueError, match="2 rollouts but main_correct has 1"):
        R.sub_rewards([[True], [True]], [1.0])
    with pytest.raises(ValueError, match=r"main_correct\[0\] must be a number in \[0, 1\]"):
        R.sub_rewards([[True]], [1.5])
    with pytest.raises(ValueError, match="sub_format_ok has 1 rollouts"):
        R.group_rewards(["x", "y"], [True, True], "x", [[True]])
