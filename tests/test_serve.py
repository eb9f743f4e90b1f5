"""`tether serve`: the real server (uvicorn in a thread, a free port) spoken to by the official openai client. The
HTTP judge equals the local judge to 1e-5 (completions; chat on single-token options), a 503 is retried, a 400 is
one clear line, a wrong token is refused, and a reward model answers /score as HF's own model scores."""

import httpx
import openai
import pytest
import torch

from tether.feedback.app import BackgroundServer
from tether.rewards import judge as J
from tether.rewards.constitution import parse_constitution
from tether.serve import ServeConfig, Served, create_app, serve_token
from tether.testing import save_tiny

torch.set_num_threads(1)
TOKEN = "test-token"
CONSTITUTION = {
    "principles": [{"name": "good", "comparison": "which is good ?"}, {"name": "short", "comparison": "which ?"}],
    "sampling": "all",
    "templates": {"comparison": "{prompt} a : {a} b : {b} {question} answer :", "options": [" a", " not a ."],
                  "score": "{prompt} {response} . answer :", "score_options": [" 1", " 2", " 3", " 4"]},
}
PAIRS = (["the film was", "it", "a story"], ["good .", "very bad", "fine !"], ["bad .", "good and fine .", "dull"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("serve") / "lm")


@pytest.fixture(scope="module")
def server(model_dir):
    with BackgroundServer(create_app(Served(str(model_dir), name="tiny"), TOKEN)) as s:
        yield s


def http_judge(server, constitution=CONSTITUTION, **kw):
    return J.Judge(J.HTTPBackend(server.url + "/v1", "tiny", TOKEN, **kw), parse_constitution(constitution))


def test_http_judge_equals_the_local_judge(server, model_dir):
    local = J.Judge(J.LocalBackend(model_dir), parse_constitution(CONSTITUTION))
    remote = http_judge(server, concurrency=3)
    for lv, rv in zip(local.compare(*PAIRS), remote.compare(*PAIRS)):
        assert rv.prob == pytest.approx(lv.prob, abs=1e-5) and rv.prob_ba == pytest.approx(lv.prob_ba, abs=1e-5)
        assert not rv.hard
    assert remote.score(PAIRS[0], PAIRS[1]) == pytest.approx(local.score(PAIRS[0], PAIRS[1]), abs=1e-5)


def test_chat_top_logprobs_fallback_equals_local_on_single_token_options(server, model_dir):
    local = J.LocalBackend(model_dir)
    context = "the film was a : good b : bad which ? answer :"
    with torch.no_grad():  # the two likeliest next tokens after the chat template (none here: the text itself)
        ids = local.tokenizer("user: " + context + "\nassistant:", return_tensors="pt").input_ids
        top = torch.log_softmax(local.model(input_ids=ids).logits[0, -1], -1).topk(2).indices.tolist()
    options = [" " + local.tokenizer.decode([t]) for t in top]
    c = {**CONSTITUTION, "sampling": "per_comparison", "swap": False,
         "principles": [{"name": "q", "comparison": "which ?"}], "templates": {**CONSTITUTION["templates"],
                                                                              "options": options}}
    chat = http_judge(server, c, api="chat").compare(["the film was"], ["good"], ["bad"])[0]
    want = J.option_probs(local.option_logprobs(["user: " + context + "\nassistant:"], options)[0])[0]
    assert not chat.hard and chat.prob == pytest.approx(want, abs=1e-5)


def test_completions_echo_and_generation_through_the_openai_client(server, model_dir):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN)
    r = client.completions.create(model="tiny", prompt="the film was good", max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "the film was good" and lp.token_logprobs[0] is None
    assert lp.text_offset == [0, 4, 9, 13] and len(lp.top_logprobs[1]) == 2
    assert max(lp.top_logprobs[1].values()) >= lp.token_logprobs[1]  # the top-2 include the likeliest token
    g = client.completions.create(model="tiny", prompt=["the film", "it"], max_tokens=5, temperature=1.0, n=2,
                                  seed=3, logprobs=0)
    assert len(g.choices) == 4 and all(c.finish_reason in ("stop", "length") for c in g.choices)
    assert all(off >= 0 for c in g.choices for off in c.logprobs.text_offset)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          seed=1)
    assert isinstance(chat.choices[0].message.content, str)
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_a_503_is_retried(model_dir):
    failures = {"left": 2, "seen": 0}
    app = create_app(Served(str(model_dir), name="tiny"), TOKEN)

    async def flaky(scope, receive, send):  # the real app behind two 503s (an overloaded server)
        if scope["type"] == "http" and scope["path"].endswith("/completions") and failures["left"]:
            failures["left"] -= 1
            failures["seen"] += 1
            await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type",
                                                                                    b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"error": {"message": "busy"}}'})
            return
        await app(scope, receive, send)

    with BackgroundServer(flaky) as s:
        v = http_judge(s, retries=3).compare(["the film was"], ["good ."], ["bad ."])
    assert failures["seen"] == 2 and 0 < v[0].prob < 1
    failures["left"] = 5
    with BackgroundServer(flaky) as s, pytest.raises(J.JudgeError, match="answered 503: busy"):
        http_judge(s, retries=1).compare(["the film was"], ["good ."], ["bad ."])


def test_a_400_is_reported_clearly(server):
    long = " ".join(["good"] * 400)  # more tokens than the model's 256 positions
    with pytest.raises(J.JudgeError, match=r"answered 400: \d+ tokens, more than the model's 256 positions"):
        http_judge(server).compare([long], ["a"], ["b"])
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="'logprobs' must be in"):
        client.completions.create(model="tiny", prompt="x", max_tokens=1, logprobs=50)


def test_the_token_is_required(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    with pytest.raises(J.JudgeError, match="answered 401"):
        J.Judge(J.HTTPBackend(server.url + "/v1", "tiny", "wrong"), parse_constitution(CONSTITUTION)).score(["a"],
                                                                                                          ["b"])


def test_token_from_the_environment_or_generated(monkeypatch):
    monkeypatch.setenv("TETHER_SERVE_TOKEN", "abc")
    assert serve_token() == ("abc", False)
    monkeypatch.delenv("TETHER_SERVE_TOKEN")
    token, generated = serve_token()
    assert generated and len(token) >= 24
    assert ServeConfig().host == "127.0.0.1"


def test_score_serves_a_reward_model(tmp_path, model_dir):
    from transformers import AutoModelForSequenceClassification

    from tether.models import load_reward_model, load_tokenizer

    rm = load_reward_model(model_dir)
    rm.save_pretrained(tmp_path / "rm")
    tok = load_tokenizer(model_dir)
    tok.save_pretrained(tmp_path / "rm")
    texts = ["the film was good .", "it was bad"]
    with BackgroundServer(create_app(Served(str(tmp_path / "rm")), TOKEN)) as s:
        r = httpx.post(s.url + "/score", json={"query": texts}, headers={"Authorization": f"Bearer {TOKEN}"})
        lm = httpx.post(s.url + "/v1/completions", json={"prompt": "x"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert lm.status_code == 400 and "reward model" in lm.json()["error"]["message"]
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        want = [hf(input_ids=torch.tensor([tok(t).input_ids + [tok.eos_token_id]])).logits[0, 0].item() for t in texts]
    assert r.json()["rewards"] == pytest.approx(want, abs=1e-5)
