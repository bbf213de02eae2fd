"""The action protocol: well-formed turns parse exactly; any text parses without raising."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mgrpo_jax.rollout.protocol import AgentProtocol, ProtocolConfig

CFG = ProtocolConfig()
MAIN, SUB, SINGLE = CFG.main(), CFG.sub(), CFG.single()


@pytest.mark.parametrize("proto,kind,final", [(MAIN, "delegate", False), (MAIN, "answer", True),
                                              (SUB, "search", False), (SUB, "read", False), (SUB, "result", True),
                                              (SINGLE, "search", False), (SINGLE, "answer", True)])
def test_well_formed_actions(proto, kind, final):
    action = proto.parse(f"<think>plan it</think> Let me act.\n<{kind}>  who founded Veltrano? </{kind}>")
    assert action.format_ok and action.error is None
    assert (action.kind, action.argument, action.is_final) == (kind, "who founded Veltrano?", final)


@pytest.mark.parametrize("text,error", [
    ("I think the answer is Paris.", "no action"),
    ("<answer>Paris", "never closed"),
    ("<answer>   </answer>", "empty"),
    ("<search>x</search>", "not an action of the main agent"),
    ("<delegate>a <answer>b</answer></delegate>", "contains another action tag"),
    ("<delegate>find x</delegate><answer>y</answer>", "more than one action"),
])
def test_malformed_main_turns(text, error):
    action = MAIN.parse(text)
    assert not action.format_ok and not action.is_final
    assert error in action.error


def test_sub_agent_may_not_answer_or_delegate():
    assert "not an action of the sub agent" in SUB.parse("<answer>Paris</answer>").error
    assert "not an action of the sub agent" in SUB.parse("<delegate>go</delegate>").error


def test_custom_tags_and_stop_sequences():
    cfg = ProtocolConfig(delegate="browser", answer="final", search="web_search", main_tools=("reason",))
    main = cfg.main()
    assert main.stop_sequences == ("</browser>", "</reason>", "</final>")
    assert main.parse("<reason>think more</reason>").kind == "reason"
    assert main.parse("<final>42</final>").is_final
    assert cfg.sub().parse("<web_search>q</web_search>").argument == "q"
    assert main.wrap_observation("doc") == "<information>doc</information>"
    assert main.parse(main.format_action("browser", "sub task")).argument == "sub task"


def test_bad_protocol_config():
    with pytest.raises(ValueError, match="role='boss'"):
        AgentProtocol("boss", ("a",), "b")
    with pytest.raises(ValueError, match="must be distinct"):
        ProtocolConfig(search="answer").single()
    with pytest.raises(ValueError, match="no brackets"):
        ProtocolConfig(answer="<answer>").main()


_tagged = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(
    ["<delegate>", "</delegate>", "<answer>", "</answer>", "<search>", "</search>", "<read>", "</read>",
     "<result>", "</result>", "<information>", "</information>", "<", ">", "</", "<think>"])), max_size=12)


@given(_tagged.map("".join))
def test_parse_never_raises_and_is_consistent(text):
    for proto in (MAIN, SUB, SINGLE):
        action = proto.parse(text)
        if action.format_ok:
            assert action.kind in proto.actions and action.argument and action.error is None
            assert action.argument == action.argument.strip()
            assert f"<{action.kind}>" in text
            assert action.is_final == (action.kind == proto.final_action)
        else:
            assert action.error and not action.is_final


@given(st.text(alphabet=st.characters(blacklist_characters="<>"), min_size=1).filter(lambda s: s.strip()),
       st.text(alphabet=st.characters(blacklist_characters="<>")))
def test_round_trip_of_any_argument(argument, prefix):
    for proto in (MAIN, SUB):
        for kind in proto.actions:
            action = proto.parse(prefix + proto.format_action(kind, argument))
            assert action.format_ok and action.kind == kind and action.argument == argument.strip()
