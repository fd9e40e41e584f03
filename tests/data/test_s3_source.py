"""An S3 prefix as a data source, read with boto3 from moto's S3 server on 127.0.0.1, which
checks request signatures: wrong credentials are refused as real S3 refuses them."""

import io
import logging

import numpy as np
import pytest
from PIL import Image

from vae_pipeline.config import build_config
from vae_pipeline.data.errors import DataError
from vae_pipeline.data.sources import snapshot_source

from ..conftest import tiny_params
from ..s3_helpers import MotoServer, free_port
from .conftest import file_tree as _tree
from .conftest import snapshot_images

BUCKET = "team-images"


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (10, 12), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def moto():
    server = MotoServer()
    s3 = server.client()
    s3.create_bucket(Bucket=BUCKET)
    for i in range(6):
        s3.put_object(
            Bucket=BUCKET, Key=f"photos/{'shirts' if i % 2 else 'shoes'}/{i}.png", Body=_png(i)
        )
    s3.put_object(Bucket=BUCKET, Key="photos/manifest.txt", Body=b"not an image")
    s3.put_object(Bucket=BUCKET, Key="photos/shoes/broken.png", Body=b"\x89PNG\r\n\x1a\nbroken")
    s3.put_object(Bucket=BUCKET, Key="elsewhere/9.png", Body=_png(9))
    yield server
    server.stop()


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """No profile files from the machine, no credentials unless a test sets them."""
    for name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


def _cfg(source):
    params = tiny_params()
    params["data"].update(source=source)
    return build_config(params)


def test_s3_prefix_is_snapshotted_and_resynced_incrementally(moto, aws_env, tmp_path, caplog):
    for k, v in moto.env().items():
        aws_env.setenv(k, v)
    caplog.set_level(logging.DEBUG)
    report = snapshot_source(_cfg(f"s3://{BUCKET}/photos"), tmp_path)
    raw = tmp_path / "data/raw"
    expected = {f"{'shirts' if i % 2 else 'shoes'}/{i}.png": _png(i) for i in range(6)}
    assert snapshot_images(raw) == expected  # other prefixes and non-images left out
    assert report.kind == "s3" and report.images == 6 and report.fetched == 6
    assert [s["path"] for s in report.skipped] == ["shoes/broken.png"]
    assert moto.secret not in caplog.text and moto.secret not in str(report)
    # a second ingest downloads nothing; a new object is the only download
    assert snapshot_source(_cfg(f"s3://{BUCKET}/photos/"), tmp_path).reused == 6
    moto.client().put_object(Bucket=BUCKET, Key="photos/shoes/10.png", Body=_png(10))
    try:
        report = snapshot_source(_cfg(f"s3://{BUCKET}/photos"), tmp_path)
        assert (report.fetched, report.reused, report.images) == (1, 6, 7)
        assert snapshot_images(raw)["shoes/10.png"] == _png(10)
    finally:
        moto.client().delete_object(Bucket=BUCKET, Key="photos/shoes/10.png")


def _ingest_fails(tmp_path, source, match):
    raw = tmp_path / "data/raw"
    before = _tree(raw) if raw.exists() else None
    with pytest.raises(DataError, match=match):
        snapshot_source(_cfg(source), tmp_path)
    assert (_tree(raw) if raw.exists() else None) == before  # nothing written
    assert not (tmp_path / "data/raw.staging").exists()


def test_missing_prefix_and_missing_bucket(moto, aws_env, tmp_path):
    for k, v in moto.env().items():
        aws_env.setenv(k, v)
    _ingest_fails(
        tmp_path, f"s3://{BUCKET}/no-such-prefix", rf"no objects under s3://{BUCKET}/no-such-prefix"
    )
    _ingest_fails(
        tmp_path, "s3://no-such-bucket/photos", r"s3://no-such-bucket/photos does not exist"
    )


def test_missing_credentials(moto, aws_env, tmp_path):
    aws_env.setenv("AWS_ENDPOINT_URL", moto.endpoint)
    _ingest_fails(
        tmp_path, f"s3://{BUCKET}/photos", r"no AWS credentials for s3://team-images/photos"
    )


@pytest.mark.parametrize("key_id_ok", [True, False])
def test_wrong_credentials_are_refused_and_not_echoed(moto, aws_env, tmp_path, key_id_ok):
    aws_env.setenv("AWS_ENDPOINT_URL", moto.endpoint)
    aws_env.setenv("AWS_ACCESS_KEY_ID", moto.key_id if key_id_ok else "AKIAWRONGWRONGWRONG1")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-do-not-print")
    with pytest.raises(
        DataError, match=r"S3 refused the credentials for s3://team-images/photos"
    ) as info:
        snapshot_source(_cfg(f"s3://{BUCKET}/photos"), tmp_path)
    assert "wrong-secret-do-not-print" not in str(info.value)


def test_unreachable_endpoint(aws_env, tmp_path):
    aws_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    aws_env.setenv("AWS_ACCESS_KEY_ID", "id")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    _ingest_fails(
        tmp_path,
        f"s3://{BUCKET}/photos",
        r"cannot reach the S3 endpoint for s3://team-images/photos",
    )
