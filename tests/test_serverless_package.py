"""`npx osls package` builds the AWS artifact offline, and the CloudFormation it generates is what the
seven functions need. One packaging run per module (it takes about a minute): the template is checked
against shared.core.spec, and the zip is imported by a bare Python to prove it is self-contained."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

from infra.deploy.aws import QUIET_ENV, log_group_name, normalized_function_name, url_output_key
from shared.core.spec import FUNCTIONS, Direction
from shared.platform.settings import SECRET_FIELDS

REPO = Path(__file__).resolve().parent.parent
STAGE = "ci"
TABLE_IDS = '{"agent_jobs":"tbl_ci_jobs"}'
LAMBDA_RUNTIME = "python3.12"  # SnapStart for Python needs 3.12+
MAX_ZIPPED_BYTES = 15 * 1024 * 1024
TABLES_CONCURRENCY = 3  # custom.tablesConcurrency: Zapier Tables allows ~100 requests / 5 s per table


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("npx") is None:
        pytest.skip("npx is not on PATH: install Node.js 20+ to build the AWS artifact")
    out = tmp_path_factory.mktemp("osls") / "package"
    # No AWS credentials or config at all: packaging must not need (or reach) AWS.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ZSYNC_"))}
    env.update(QUIET_ENV)
    env.update({"AWS_CONFIG_FILE": str(out.parent / "no-aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(out.parent / "no-aws-credentials"),
                "AWS_EC2_METADATA_DISABLED": "true", "ZSYNC_TABLE_IDS": TABLE_IDS})
    # One packaging run at a time (xdist workers): `npm ci` and the requirements plugin's
    # .serverless/requirements.txt and pip cache are shared between runs.
    lock_path = Path(tempfile.gettempdir()) / f"zsync-osls-package-{os.getuid()}.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (REPO / "node_modules" / "osls").is_dir():  # `make` installs them; a bare checkout may not have
            subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=REPO, check=True)
        result = subprocess.run(
            ["npx", "--no-install", "osls", "package", "--stage", STAGE, "--package", str(out)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False,
        )
    assert result.returncode == 0, f"osls package failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def template(package_dir: Path) -> dict[str, Any]:
    return json.loads((package_dir / "cloudformation-template-update-stack.json").read_text())


def _of_type(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template["Resources"].items() if v["Type"] == kind}


def _logical(name: str, suffix: str) -> str:
    return f"{normalized_function_name(name)}{suffix}"


MONITOR = "monitor"  # the scheduled alert check: an operator job next to the seven sync functions


def _sync_only(resources: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in resources.items() if not k.startswith(normalized_function_name(MONITOR))}


def test_seven_lambda_functions_with_handler_runtime_and_env(template: dict[str, Any]) -> None:
    functions = _sync_only(_of_type(template, "AWS::Lambda::Function"))
    assert len(functions) == len(FUNCTIONS) == 7
    for name, fn in FUNCTIONS.items():
        props = functions[_logical(name, "LambdaFunction")]["Properties"]
        assert props["FunctionName"] == f"zsync-{STAGE}-{name}"
        assert props["Handler"] == "functions/lambda_adapter.handler"
        assert props["Runtime"] == LAMBDA_RUNTIME
        assert props["Architectures"] in (["x86_64"], ["arm64"])
        assert props["Timeout"] <= 30
        if fn.direction is Direction.TO_TABLES:
            assert props["Timeout"] >= 25, "Tables API calls retry for up to 20 s"
        env = props["Environment"]["Variables"]
        assert env["ZSYNC_FUNCTION"] == name
        assert env["ZSYNC_SSM_PREFIX"] == f"/zsync/{STAGE}/"
        assert env["ZSYNC_DLQ_URL"] == {"Ref": "DeadLetterQueue"}
        assert env["ZSYNC_TABLE_IDS"] == TABLE_IDS
        assert env["ZSYNC_ZAPIER_BASE_URL"] == "https://sdkapi.zapier.com"
        assert env["ZSYNC_ZAPIER_TOKEN_URL"] == "https://zapier.com/oauth/token/"
        for secret in SECRET_FIELDS:
            assert f"ZSYNC_{secret.upper()}" not in env, f"{secret} must come from SSM, not the Lambda env"
        for key, value in env.items():
            assert not (isinstance(value, str) and value.startswith("postgres")), key


def test_function_urls_are_public_and_guarded_by_our_secret(template: dict[str, Any]) -> None:
    urls = _of_type(template, "AWS::Lambda::Url")
    assert len(urls) == 7
    permissions = _of_type(template, "AWS::Lambda::Permission")
    for name in FUNCTIONS:
        props = urls[_logical(name, "LambdaFunctionUrl")]["Properties"]
        assert props["AuthType"] == "NONE"
        # the URL invokes the SnapStart alias (a published version), not $LATEST
        assert props["TargetFunctionArn"] == _alias_arn(name)
        perm = permissions[_logical(name, "LambdaPermissionFnUrl")]["Properties"]
        assert perm["FunctionName"] == _alias_arn(name)
        assert perm["Action"] == "lambda:InvokeFunctionUrl"
        assert perm["FunctionUrlAuthType"] == "NONE"


def _alias_arn(name: str) -> dict[str, Any]:
    return {"Fn::Join": [":", [{"Fn::GetAtt": [_logical(name, "LambdaFunction"), "Arn"]}, "snapstart"]]}


def test_snapstart_on_every_function_through_a_published_version_alias(template: dict[str, Any]) -> None:
    functions = _of_type(template, "AWS::Lambda::Function")
    versions = _of_type(template, "AWS::Lambda::Version")
    aliases = _of_type(template, "AWS::Lambda::Alias")
    for name in FUNCTIONS:
        props = functions[_logical(name, "LambdaFunction")]["Properties"]
        assert props["SnapStart"] == {"ApplyOn": "PublishedVersions"}, name
        alias = aliases[_logical(name, "SnapStartLambdaAlias")]["Properties"]
        assert alias["Name"] == "snapstart"
        assert alias["FunctionName"] == {"Ref": _logical(name, "LambdaFunction")}
        version_id = alias["FunctionVersion"]["Fn::GetAtt"][0]
        assert versions[version_id]["Properties"]["FunctionName"] == {"Ref": _logical(name, "LambdaFunction")}


def test_reserved_concurrency_keeps_tables_writers_under_the_rate_limit(template: dict[str, Any]) -> None:
    functions = _of_type(template, "AWS::Lambda::Function")
    for name, fn in FUNCTIONS.items():
        props = functions[_logical(name, "LambdaFunction")]["Properties"]
        if fn.direction is Direction.TO_TABLES:
            assert props["ReservedConcurrentExecutions"] == TABLES_CONCURRENCY, name
        else:
            assert "ReservedConcurrentExecutions" not in props, name


def test_dead_letter_queue(template: dict[str, Any]) -> None:
    queues = _of_type(template, "AWS::SQS::Queue")
    assert list(queues) == ["DeadLetterQueue"]
    props = queues["DeadLetterQueue"]["Properties"]
    assert props["QueueName"] == f"zsync-{STAGE}-dlq"
    assert props["MessageRetentionPeriod"] == 14 * 24 * 3600
    assert "RedrivePolicy" not in props


def _statements(template: dict[str, Any]) -> list[dict[str, Any]]:
    role = template["Resources"]["IamRoleLambdaExecution"]["Properties"]
    return [s for policy in role["Policies"] for s in policy["PolicyDocument"]["Statement"]]


def _grants(template: dict[str, Any], action: str) -> list[str]:
    """Every resource an action is allowed on, as JSON text (CloudFormation functions included)."""
    found = []
    for s in _statements(template):
        actions = s["Action"] if isinstance(s["Action"], list) else [s["Action"]]
        if s["Effect"] == "Allow" and action in actions:
            resources = s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]]
            found += [json.dumps(r) for r in resources]
    return found


def test_iam_allows_exactly_our_secrets_and_queue(template: dict[str, Any]) -> None:
    for action in ("ssm:GetParameter", "ssm:GetParameters", "ssm:GetParametersByPath"):
        grants = _grants(template, action)
        assert grants and all(f":parameter/zsync/{STAGE}" in g for g in grants), action
    assert any(g.endswith(f':parameter/zsync/{STAGE}"]]}}') for g in _grants(template, "ssm:GetParametersByPath"))
    sm = _grants(template, "secretsmanager:GetSecretValue")
    assert sm and all(f":secret:zsync/{STAGE}/*" in g for g in sm)
    assert _grants(template, "kms:Decrypt")
    for action in ("sqs:SendMessage", "sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"):
        assert _grants(template, action) == [json.dumps({"Fn::GetAtt": ["DeadLetterQueue", "Arn"]})], action
    for s in _statements(template):
        actions = s["Action"] if isinstance(s["Action"], list) else [s["Action"]]
        assert "*" not in actions and not any(a.endswith(":*") for a in actions)


def test_monitor_runs_every_five_minutes_without_a_url(template: dict[str, Any]) -> None:
    logical = _logical(MONITOR, "LambdaFunction")
    props = _of_type(template, "AWS::Lambda::Function")[logical]["Properties"]
    assert props["Handler"] == "shared/services/alerts.lambda_handler" and props["Runtime"] == "python3.12"
    assert props["FunctionName"] == f"zsync-{STAGE}-{MONITOR}" and props["Timeout"] <= 120
    env = props["Environment"]["Variables"]
    assert env["ZSYNC_SSM_PREFIX"] == f"/zsync/{STAGE}/" and env["ZSYNC_DLQ_URL"] == {"Ref": "DeadLetterQueue"}
    for secret in SECRET_FIELDS:  # the Slack URL and the database URL come from SSM at cold start
        assert f"ZSYNC_{secret.upper()}" not in env, secret
    rules = [r["Properties"] for r in _of_type(template, "AWS::Events::Rule").values()
             if r["Properties"]["Targets"][0]["Arn"] == {"Fn::GetAtt": [logical, "Arn"]}]
    assert len(rules) == 1 and rules[0]["ScheduleExpression"] == "rate(5 minutes)" and rules[0]["State"] == "ENABLED"
    assert not any(k.startswith(normalized_function_name(MONITOR)) for k in _of_type(template, "AWS::Lambda::Url"))
    assert _grants(template, "sqs:GetQueueAttributes")  # the dead-letter depth
    assert _of_type(template, "AWS::Logs::LogGroup")[_logical(MONITOR, "LogGroup")]["Properties"]["RetentionInDays"]


def test_each_inbox_function_has_the_every_minute_safety_drain(template: dict[str, Any]) -> None:
    """serverless.yml's schedule: each *_to_supabase function drains its trigger inbox every minute."""
    drains = {}
    for rule in _of_type(template, "AWS::Events::Rule").values():
        props = rule["Properties"]
        for target in props["Targets"]:
            if json.loads(target.get("Input") or "{}") == {"zsync": "drain_inbox"}:
                arn = json.dumps(target["Arn"])  # the function, or its SnapStart alias/version
                names = [name for name in FUNCTIONS if normalized_function_name(name) in arn]
                assert len(names) == 1, arn
                drains[names[0]] = props["ScheduleExpression"]
    to_supabase = [name for name, fn in FUNCTIONS.items() if fn.direction is Direction.TO_SUPABASE]
    assert drains == dict.fromkeys(to_supabase, "rate(1 minute)")


def test_one_log_group_per_function_with_retention(template: dict[str, Any]) -> None:
    groups = _sync_only(_of_type(template, "AWS::Logs::LogGroup"))
    assert len(groups) == 7
    for name in FUNCTIONS:
        props = groups[_logical(name, "LogGroup")]["Properties"]
        assert props["LogGroupName"] == log_group_name(name, STAGE)
        assert 1 <= props["RetentionInDays"] <= 400


def test_outputs_name_every_function_url(template: dict[str, Any]) -> None:
    outputs = template["Outputs"]
    for name in FUNCTIONS:
        # infra.deploy.aws reads the deployed URLs back by exactly these keys
        assert outputs[url_output_key(name)]["Value"] == {
            "Fn::GetAtt": [_logical(name, "LambdaFunctionUrl"), "FunctionUrl"]}
    assert outputs["DeadLetterQueueUrl"]["Value"] == {"Ref": "DeadLetterQueue"}


def test_artifact_holds_the_code_and_requirements_but_nothing_else(package_dir: Path) -> None:
    with zipfile.ZipFile(package_dir / "zsync.zip") as zf:
        names = zf.namelist()
    top = {n.split("/", 1)[0] for n in names}
    for needed in ("functions/main.py", "functions/lambda_adapter.py", "shared/platform/aws_secrets.py",
                   "shared/edge/handler.py", "shared/core/spec.py"):
        assert needed in names, needed
    assert any(n.startswith("infra/supabase/migrations/") and n.endswith(".sql") for n in names)
    for package in ("functions_framework", "flask", "apig_wsgi", "pydantic", "pydantic_core", "psycopg",
                    "psycopg_binary", "psycopg_pool", "requests", "tenacity"):
        assert package in top, package
    assert any(n.startswith("pydantic_core/") and "x86_64-linux-gnu" in n for n in names) or any(
        n.startswith("pydantic_core/") and "aarch64-linux-gnu" in n for n in names), "Linux wheels for Lambda"
    for excluded in (".venv", "node_modules", "tests", "bench", ".local", ".zsync", ".git", "boto3", "botocore",
                     # google-cloud-logging's API client stack, never used (shared/platform/logs.py only formats lines)
                     "grpc", "cryptography", "cffi",
                     # functions-framework's own servers: Lambda serves through apig-wsgi
                     "gunicorn", "uvicorn", "starlette", "watchdog"):
        assert excluded not in top, excluded
    assert "google" in top and any(n.startswith("google/cloud/logging_v2/handlers/structured_log") for n in names)
    assert any(n.startswith("psycopg_binary/") and f"cpython-{LAMBDA_RUNTIME[6:].replace('.', '')}" in n
               for n in names), f"wheels built for {LAMBDA_RUNTIME}"
    assert not any(n.startswith(("infra/local/", "infra/deploy/")) for n in names)
    assert not any(n.startswith("infra/") and n.endswith(".py") and n != "infra/__init__.py" for n in names)
    assert not any(n.endswith(("serverless.yml", "package.json")) for n in names)


def test_artifact_is_small(package_dir: Path) -> None:
    size = (package_dir / "zsync.zip").stat().st_size
    print(f"artifact: {size / 1e6:.1f} MB zipped")
    assert size <= MAX_ZIPPED_BYTES, f"{size / 1e6:.1f} MB zipped, more than {MAX_ZIPPED_BYTES / 1e6:.1f} MB"
    with zipfile.ZipFile(package_dir / "zsync.zip") as zf:
        unzipped = sum(i.file_size for i in zf.infolist())
    assert unzipped <= 250 * 1024 * 1024, "Lambda's unzipped limit"


def _lambda_python() -> str | None:
    """An interpreter of the Lambda runtime's version: ZSYNC_LAMBDA_PYTHON, pyenv's, or python3.X on PATH."""
    version = LAMBDA_RUNTIME.removeprefix("python")
    candidates = [os.environ.get("ZSYNC_LAMBDA_PYTHON"),
                  *map(str, sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}"))),
                  shutil.which(f"python{version}")]
    for candidate in filter(None, candidates):
        check = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                               text=True, check=False)
        if check.returncode == 0 and check.stdout.strip() == str(tuple(map(int, version.split(".")))):
            return candidate
    return None


@pytest.mark.skipif(sys.platform != "linux", reason="the artifact holds Linux wheels")
def test_artifact_runs_on_a_bare_python(package_dir: Path, tmp_path: Path, database_url: str) -> None:
    """Unzip the artifact and call its Lambda handler from a Python of the runtime's version with no
    site-packages at all."""
    python = _lambda_python()
    if python is None:
        pytest.skip(f"no {LAMBDA_RUNTIME} interpreter here (set ZSYNC_LAMBDA_PYTHON)")
    root = tmp_path / "task"
    with zipfile.ZipFile(package_dir / "zsync.zip") as zf:
        zf.extractall(root)
    code = f"""
import json, sys
sys.path.insert(0, {str(root)!r})
from functions.lambda_adapter import handler
def event(headers):
    return {{"version": "2.0", "rawPath": "/", "rawQueryString": "", "isBase64Encoded": False,
             "headers": {{"content-type": "application/json", "host": "x.lambda-url.us-east-1.on.aws", **headers}},
             "requestContext": {{"http": {{"method": "POST", "path": "/", "protocol": "HTTP/1.1",
                                          "sourceIp": "203.0.113.1", "userAgent": "t"}}}},
             "body": json.dumps({{"zsync_ping": True}})}}
out = [handler(event({{}}), None), handler(event({{"x-zsync-secret": "bare-secret"}}), None)]
from shared.services.alerts import lambda_handler as monitor  # the scheduled check, from the same artifact
print(json.dumps(monitor({{}}, None), default=str), file=sys.stderr)
print("RESULT " + json.dumps([[r["statusCode"], json.loads(r["body"])] for r in out]))
"""
    env = {"PATH": os.environ.get("PATH", ""), "ZSYNC_FUNCTION": "agent_jobs_to_tables",
           "ZSYNC_WEBHOOK_SECRET": "bare-secret", "ZSYNC_DATABASE_URL": database_url}
    result = subprocess.run([python, "-I", "-S", "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    [answers] = [line.removeprefix("RESULT ") for line in lines if line.startswith("RESULT ")]
    (unsigned, unsigned_body), (signed, signed_body) = json.loads(answers)
    # google-cloud-logging's StructuredLogHandler works from the slim artifact (no grpc, no cryptography)
    events = [json.loads(line) for line in lines if line.startswith("{") and '"event"' in line]
    assert [e["status"] for e in events if e["event"] == "delivery"] == [401, 200], lines
    assert all(e["logging.googleapis.com/sourceLocation"]["file"].endswith("shared/edge/handler.py")
               for e in events if e["event"] == "delivery")
    assert unsigned == 401, unsigned_body
    assert signed == 200, signed_body
    assert signed_body["outcome"] == "ping" and signed_body["function"] == "agent_jobs_to_tables"
    assert '"firing": []' in result.stderr  # the monitor ran against the database from the bare artifact
