"""The OpenAPI spec: in sync with the routes, served with a page, and fuzzed against the server."""
from __future__ import annotations

import json
import re
import sys
import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance, not_a_server_error, response_schema_conformance, status_code_conformance,
)

from conftest import ROOT, fake_config
from fakebackend import FakePlugin

from vecshim.app import create_app
from vecshim.openapi import get_spec

sys.path.insert(0, str(ROOT / "scripts"))
from screenshot_docs import find_chromium, render  # noqa: E402

AUTOMATIC_METHODS = {"HEAD", "OPTIONS"}
FUZZ_EXAMPLES = 40
#: A bound on the run (a hang would hit it), not a speed claim: the shared CI box is often loaded.
FUZZ_BUDGET_S = 180


def served_routes(app) -> set[tuple[str, str]]:
    """(OpenAPI path, method) for every route the app serves, Flask's automatic ones aside."""
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        routes |= {(path, m.lower()) for m in rule.methods - AUTOMATIC_METHODS}
    return routes


def spec_routes(spec: dict) -> set[tuple[str, str]]:
    return {(path, method) for path, item in spec["paths"].items() for method in item}


def test_every_registered_route_is_in_the_spec_and_nothing_else():
    app = create_app(fake_config(), plugins=[FakePlugin()], load_entrypoints=False, load=False)
    served, described = served_routes(app), spec_routes(get_spec())
    assert served - described == set(), "routes missing from vecshim/openapi.py"
    assert described - served == set(), "vecshim/openapi.py describes routes that do not exist"


def test_every_ref_resolves_and_every_operation_documents_its_replies():
    spec = get_spec()
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(spec)))
    assert refs <= set(spec["components"]["schemas"])
    for path, item in spec["paths"].items():
        for method, op in item.items():
            assert op["summary"] and op["tags"] and op["responses"], (method, path)
            if method == "post":
                assert {"200", "400", "404", "413"} <= set(op["responses"]), path


def test_openapi_json_and_docs_page_are_served_offline(serve):
    s = serve(fake_config())
    c = s.client()
    r = c.request("GET", "/openapi.json")
    assert r.status == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == json.loads(json.dumps(get_spec()))
    page = c.request("GET", "/docs")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    html = page.body.decode()
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the page must not load external assets"
    assert "@import" not in html and "url(" not in html
    assert '"/v1/embeddings"' in html  # the spec is embedded, no fetch needed


@pytest.mark.slow
@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (apt-get install -y chromium)")
def test_docs_page_renders_every_operation_in_a_real_browser(serve):
    s = serve(fake_config())
    dom = render(f"{s.url}/docs?open=post-/v1/embeddings", chromium=find_chromium())
    n_ops = len(spec_routes(get_spec()))
    assert dom.count('class="op"') >= n_ops  # operations plus schema boxes, built by the page's script
    assert dom.count('class="method post"') == sum(m == "post" for _, m in spec_routes(get_spec()))
    assert 'id="post-/v1/embeddings" open=""' in dom


# -- fuzzing --------------------------------------------------------------------

def assert_json_error_body(response, path: str = "") -> None:
    """Every error is a JSON object with `error` (a string, or an OpenAI error object under /v1),
    except Cohere's rerank routes, whose clients read `{"message": ...}`."""
    if response.status_code < 400:
        return
    content_type = response.headers.get("content-type", [""])[0]  # schemathesis keeps a list per header
    assert content_type.startswith("application/json"), response.text[:200]
    body = response.json()
    if path in ("/v1/rerank", "/v2/rerank"):
        assert isinstance(body, dict) and isinstance(body.get("message"), str) and "error" not in body, body
        return
    assert isinstance(body, dict) and "error" in body, body
    err = body["error"]
    assert isinstance(err, str) or (isinstance(err, dict) and isinstance(err.get("message"), str)), body
    assert "Traceback" not in response.text


def fuzz_operation(operation, base_url: str, mode: GenerationMode, deadline: float, **fixed) -> int:
    """Run one operation's strategy; return how many requests were sent."""
    checks = [not_a_server_error]
    if mode is GenerationMode.POSITIVE:
        checks += [status_code_conformance, content_type_conformance, response_schema_conformance]
    sent = []

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode, **fixed))
    def run(case):
        if time.monotonic() > deadline:
            return
        response = case.call(base_url=base_url, timeout=10)
        sent.append(response.status_code)
        case.validate_response(response, checks=checks)
        assert_json_error_body(response, operation.path)

    try:
        run()
    except Exception as err:
        err.add_note(f"while fuzzing {operation.label} ({mode.value})")
        raise
    return len(sent)


@pytest.mark.slow
def test_fuzz_every_operation_from_the_spec(serve):
    cfg = fake_config()
    cfg["models"]["fake"]["aliases"] = ["text-embedding-3-small"]
    cfg["cache"] = {"enabled": True}
    s = serve(cfg)
    schema = schemathesis.openapi.from_url(f"{s.url}/openapi.json")
    deadline = time.monotonic() + FUZZ_BUDGET_S
    total = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        name = "fake-rerank" if operation.path.endswith("/rerank") else "fake"
        fixed = {"path_parameters": {"name": name}} if "{name}" in operation.path else {}
        total += fuzz_operation(operation, s.url, GenerationMode.POSITIVE, deadline, **fixed)
        total += fuzz_operation(operation, s.url, GenerationMode.POSITIVE, deadline)
        if len(operation.body):  # any string is a valid path parameter: only bodies can be made invalid
            total += fuzz_operation(operation, s.url, GenerationMode.NEGATIVE, deadline)
    assert time.monotonic() < deadline, "the fuzz run hit its time budget"
    assert total > 500
    assert s.state.not_ready_reason() is None  # the server survived
