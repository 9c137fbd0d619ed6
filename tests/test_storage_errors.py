"""A store's refusals are user errors, and uploads survive what S3 throws at them (moto's S3 server on 127.0.0.1).

`data_tools shard / info / verify` and the training preflight end a refused request (a missing bucket, a key the
store does not know, no credentials at all) with one `error:` line naming the URL and the cause, exit 2, at once;
`shard --out s3://` uploads through boto3's managed transfer: a 503 is retried, a staged shard above the multipart
threshold goes in parts, and `_info.json` is the last object written.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools import format as fmt
from data_tools.upload import MULTIPART_ENV
from tests.helpers.servers import MotoServer, UploadProxy, environ_with

ROOT = Path(__file__).resolve().parents[1]
REFUSAL_TIMEOUT_S = 10  # the bound for a refused `shard`; a refusal is never retried
PART_MIN = 5 << 20  # S3's (and s3transfer's) smallest part
# Credentials come from the test's environment only: not from a profile of this machine, nor from an EC2 role.
ISOLATED = {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
ISOLATED["AWS_EC2_METADATA_DISABLED"] = "true"


@pytest.fixture(scope="module")
def moto():
    """Its own moto server (this module turns its key checks on and off) with an empty bucket `shards`."""
    import boto3

    with MotoServer() as m:
        s3 = boto3.client("s3", endpoint_url=m.url, aws_access_key_id="test", aws_secret_access_key="test")
        s3.create_bucket(Bucket="shards")
        yield m


def env_of(moto: MotoServer, **changes: str | None) -> dict[str, str]:
    """The environment of a command against `moto` (a None value removes the variable)."""
    env = environ_with({**moto.env, **ISOLATED})
    for k, v in changes.items():
        env.pop(k, None) if v is None else env.__setitem__(k, v)
    return env


def no_credentials(moto: MotoServer) -> dict[str, str]:
    return env_of(moto, AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None, AWS_SESSION_TOKEN=None, AWS_PROFILE=None)


def run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def one_error_line(p: subprocess.CompletedProcess) -> str:
    """The single line a refused command prints (and nothing like a traceback)."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (p.returncode, p.stderr[-3000:])
    return lines[0]


def shard_cmd(src: Path, url: str, staging: Path) -> list[str]:
    return ["-m", "data_tools", "shard", str(src), url, "--staging", str(staging), "--workers", "1", "--no-progress"]


def objects(moto: MotoServer, bucket: str, prefix: str) -> dict[str, bytes]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto.url, aws_access_key_id="test", aws_secret_access_key="test")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    return {k[len(prefix) :]: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


# ------------------------------------------------------------------------------------------- refusals


def test_shard_to_a_missing_bucket_exits_2_before_sharding(moto, digits_dir, tmp_path):
    url = "s3://no-such-bucket/prefix/"
    p = run(shard_cmd(digits_dir, url, tmp_path / "staging"), env_of(moto), REFUSAL_TIMEOUT_S)
    line = one_error_line(p)
    assert line.startswith(f"error: {url}: ") and "NoSuchBucket" in line and "does not exist" in line
    assert not (tmp_path / "staging").exists()  # refused before any image was sharded


def test_shard_with_a_key_the_store_does_not_know_exits_2(moto, digits_dir, tmp_path):
    env = env_of(moto, AWS_ACCESS_KEY_ID="AKIAUNKNOWNKEY000000", AWS_SECRET_ACCESS_KEY="nope")
    moto.require_known_keys(True)
    try:
        p = run(shard_cmd(digits_dir, "s3://shards/unknown-key/", tmp_path / "staging"), env, REFUSAL_TIMEOUT_S)
    finally:
        moto.require_known_keys(False)
    line = one_error_line(p)
    assert "s3://shards/unknown-key/" in line and "InvalidAccessKeyId" in line and "AWS_ACCESS_KEY_ID" in line


def test_shard_info_and_verify_without_credentials_fail_at_once_naming_the_variables(moto, digits_dir, tmp_path):
    env = no_credentials(moto)
    url = "s3://shards/no-credentials/"
    for args in (shard_cmd(digits_dir, url, tmp_path / "staging"), ["-m", "data_tools", "info", url],
                 ["-m", "data_tools", "verify", url, "--no-progress"]):  # fmt: skip
        line = one_error_line(run(args, env, REFUSAL_TIMEOUT_S))  # not 8 retries and 35 s
        assert url in line and "no AWS credentials" in line, line
        assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE" in line, line


@pytest.mark.parametrize("command", ["info", "verify"])
def test_info_and_verify_of_a_missing_bucket_exit_2(moto, command):
    url = "s3://no-such-bucket/prefix/"
    line = one_error_line(run(["-m", "data_tools", command, url], env_of(moto), REFUSAL_TIMEOUT_S))
    assert f"{url}{fmt.INFO}" in line and "NoSuchBucket" in line


@pytest.mark.parametrize(
    "shards, credentials",
    [
        ("s3://no-such-bucket/digits/", True),  # a folder: its _info.json is read first
        ("s3://no-such-bucket/digits/train-{000000..000001}.tar", True),  # a pattern: no _info.json is required
        ("s3://shards/digits/", False),
    ],
)
def test_training_preflight_names_a_refused_store_in_one_line(moto, tmp_path, shards, credentials):
    env = env_of(moto) if credentials else no_credentials(moto)
    args = ["-m", "pretrain.train", "--config", "configs/tiny_digits.yaml", f"data.train_shards={shards}"]
    args += [f"run.output_dir={tmp_path / 'run'}", "data.val_shards=", "data.mode=resampled"]
    p = run(args, env, timeout=180)  # importing torch and DeepSpeed takes most of it; the refusal is not retried
    line = [x for x in p.stderr.splitlines() if x.startswith("error: ")]
    assert p.returncode == 2 and len(line) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert shards.split("{")[0] in line[0]
    assert ("NoSuchBucket" if credentials else "no AWS credentials") in line[0], line[0]


# ------------------------------------------------------------------------------------------- uploads


def test_an_upload_answered_503_twice_per_object_is_retried_and_info_json_comes_last(moto, digits_dir, tmp_path):
    staging = tmp_path / "staging"
    with UploadProxy(moto.url, fail_each_write=2) as proxy:  # every object: 503, 503, then through
        p = run(shard_cmd(digits_dir, "s3://shards/retried/", staging), env_of(moto, AWS_ENDPOINT_URL=proxy.url), 300)
    assert p.returncode == 0, p.stderr[-3000:]
    puts = [path.split("?")[0] for method, path, status in proxy.log if method == "PUT" and status == 200]
    staged = {f.name: f.read_bytes() for f in staging.iterdir() if f.name.endswith((".tar", ".idx", fmt.INFO))}
    assert len(puts) == len(staged) >= 3  # a shard, its index, _info.json: one PUT each that went through
    assert [s for _, _, s in proxy.log].count(503) == 2 * len(puts)  # each after two 503s
    assert puts[-1].endswith(f"/retried/{fmt.INFO}") and sum(x.endswith(fmt.INFO) for x in puts) == 1
    assert proxy.parts() == 0  # small files: one PUT each
    assert objects(moto, "shards", "retried/") == staged  # every file, byte for byte


def test_a_shard_above_the_threshold_goes_in_parts_and_reads_back_identical(moto, tmp_path):
    src = tmp_path / "noise"
    rng = np.random.default_rng(0)
    for i in range(4):  # 4 incompressible 800x800 PNGs: one train shard of ~7.7 MB
        (src / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (800, 800, 3), dtype=np.uint8)).save(src / f"c{i % 2}" / f"{i}.png")
    staging = tmp_path / "staging"
    env = env_of(moto, **{MULTIPART_ENV: str(PART_MIN)})
    with UploadProxy(moto.url) as proxy:
        p = run(shard_cmd(src, "s3://shards/parts/", staging), {**env, "AWS_ENDPOINT_URL": proxy.url}, 300)
    assert p.returncode == 0, p.stderr[-3000:]
    shard = staging / "train-000000.tar"
    size = shard.stat().st_size
    assert size > PART_MIN
    assert proxy.parts("/parts/train-000000.tar") == math.ceil(size / PART_MIN) >= 2
    assert proxy.parts(fmt.INFO) == 0  # below the threshold: one PUT
    assert objects(moto, "shards", "parts/")["train-000000.tar"] == shard.read_bytes()
