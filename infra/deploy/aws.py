"""AWS: run ``npx osls package|deploy`` and read the deployed function URLs from the stack outputs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from infra.deploy import REPO, DeployError
from shared.core.spec import FUNCTIONS

SERVICE = "zsync"
# osls needs no account for `package`; keep it from phoning home or nagging.
QUIET_ENV = {"SLS_TELEMETRY_DISABLED": "1", "SLS_NOTIFICATIONS_MODE": "off", "SLS_DEPRECATION_DISABLE": "*"}


def stack_name(stage: str) -> str:
    """Serverless' default stack name: ``<service>-<stage>``."""
    return f"{SERVICE}-{stage}"


def normalized_function_name(name: str) -> str:
    """Serverless' logical-id form of a function key (``agent_jobs_to_tables`` ->
    ``AgentUnderscorejobsUnderscoretoUnderscoretables``)."""
    normalized = name.replace("-", "Dash").replace("_", "Underscore")
    return normalized[:1].upper() + normalized[1:]


def url_output_key(name: str) -> str:
    """The stack output Serverless creates for a function with ``url: true``."""
    return f"{normalized_function_name(name)}LambdaFunctionUrl"


def log_group_name(name: str, stage: str) -> str:
    return f"/aws/lambda/{SERVICE}-{stage}-{name}"


def osls_command(action: str, stage: str, region: str | None = None, package_dir: Path | None = None) -> list[str]:
    cmd = ["npx", "--no-install", "osls", action, "--stage", stage]
    if region:
        cmd += ["--region", region]
    if package_dir is not None:
        cmd += ["--package", str(package_dir)]
    return cmd


def osls_env(base: dict[str, str] | None = None) -> dict[str, str]:
    return {**(os.environ if base is None else base), **QUIET_ENV}


def check_tooling(repo: Path = REPO) -> None:
    if shutil.which("npx") is None:
        raise DeployError("npx is not on PATH: install Node.js 20+ (https://nodejs.org), then run `npm ci`.")
    if not (repo / "node_modules" / "osls").is_dir():
        raise DeployError(f"osls is not installed in {repo / 'node_modules'}: run `npm ci` (or `make install`).")


def check_credentials(region: str | None) -> None:
    import boto3

    if boto3.Session(region_name=region).get_credentials() is None:
        raise DeployError(
            "no AWS credentials: set AWS_PROFILE (after `aws configure` / `aws sso login`) or "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, then run again."
        )


def run_osls(action: str, stage: str, region: str | None = None, package_dir: Path | None = None,
             repo: Path = REPO, extra_env: dict[str, str] | None = None) -> None:
    """``npx osls <action>`` in the repository; raises :class:`DeployError` when it fails."""
    check_tooling(repo)
    if action == "deploy":
        check_credentials(region)
    cmd = osls_command(action, stage, region, package_dir)
    result = subprocess.run(cmd, cwd=repo, env={**osls_env(), **(extra_env or {})}, check=False)
    if result.returncode != 0:
        raise DeployError(f"`{' '.join(cmd)}` failed with exit code {result.returncode} (its output is above).")


REQUIRED_SECRETS = ("database_url", "webhook_secret", "zapier_client_id", "zapier_client_secret")


def _client(service: str, region: str | None) -> Any:
    import boto3

    return boto3.client(
        service,
        region_name=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        endpoint_url=os.environ.get("ZSYNC_AWS_ENDPOINT_URL") or None,
    )


def missing_secrets(stage: str, region: str | None = None) -> list[str]:
    """Required secret names found neither in SSM ``/zsync/<stage>/`` nor in Secrets Manager
    ``zsync/<stage>/<name>`` (names only: nothing is decrypted). Raises DeployError if AWS can't be read."""
    from botocore.exceptions import BotoCoreError, ClientError

    prefix = f"/zsync/{stage}"
    try:
        pages = _client("ssm", region).get_paginator("get_parameters_by_path").paginate(Path=prefix)
        found = {p["Name"].rsplit("/", 1)[-1] for page in pages for p in page.get("Parameters", [])}
        missing = []
        sm = _client("secretsmanager", region)
        for name in REQUIRED_SECRETS:
            if name in found:
                continue
            try:
                sm.describe_secret(SecretId=f"zsync/{stage}/{name}")
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                    raise
                missing.append(name)
    except (BotoCoreError, ClientError) as exc:
        raise DeployError(
            f"cannot list the secrets under {prefix}/ ({exc}); use --skip-secret-check to deploy anyway"
        ) from None
    return missing


def _cloudformation(region: str | None) -> Any:
    return _client("cloudformation", region)


def stack_outputs(stage: str, region: str | None = None) -> dict[str, str]:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    name = stack_name(stage)
    try:
        stacks = _cloudformation(region).describe_stacks(StackName=name)["Stacks"]
    except NoCredentialsError:
        raise DeployError("no AWS credentials to read the stack outputs (see `zsync deploy --help`).") from None
    except ClientError as exc:
        raise DeployError(f"cannot read CloudFormation stack {name}: {exc.response['Error'].get('Message')}") from None
    except BotoCoreError as exc:
        raise DeployError(f"cannot read CloudFormation stack {name}: {exc}") from None
    if not stacks:
        raise DeployError(f"CloudFormation stack {name} does not exist: deploy first")
    return {o["OutputKey"]: o["OutputValue"] for o in stacks[0].get("Outputs", [])}


def function_urls_from_stack(stage: str, region: str | None = None) -> dict[str, str]:
    """``{function name: URL}`` for all seven functions, from the stack's ``*LambdaFunctionUrl`` outputs."""
    outputs = stack_outputs(stage, region)
    urls = {name: outputs[url_output_key(name)] for name in FUNCTIONS if url_output_key(name) in outputs}
    missing = sorted(set(FUNCTIONS) - set(urls))
    if missing:
        raise DeployError(f"stack {stack_name(stage)} has no function URL output for {', '.join(missing)}")
    return urls
