"""``s3://`` inputs against a real S3 API: moto's server on 127.0.0.1, reached through the
standard ``AWS_ENDPOINT_URL`` setting (as a MinIO or any S3-compatible store is). Corpora,
fine-tuning data and evaluation text are read from the bucket as from a local directory; a store
that cannot be reached is an error naming the cause, not a path that "does not exist"."""

import gzip
import json
import socket

import pytest

from pipeline import schema as S
from pipeline.data.sources import SourceConfig, expand_source, read_file

moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3_endpoint():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch):
    import boto3
    import s3fs

    for key, value in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # a filesystem cached with another endpoint is not reused
    client = boto3.client("s3")
    client.create_bucket(Bucket="corp")
    records = [{"text": f"Document number {i} about markets and shares.", "label": "business"} for i in range(3)]
    client.put_object(Bucket="corp", Key="corpus/a.jsonl",
                      Body=("".join(json.dumps(r) + "\n" for r in records) + "not json\n").encode())
    client.put_object(Bucket="corp", Key="corpus/sub/b.jsonl.gz",
                      Body=gzip.compress(b'{"text": "A compressed file, one record.", "label": "tech"}\n'))
    client.put_object(Bucket="corp", Key="corpus/sub/c.csv", Body=b"text;label\nA semicolon CSV row.;sport\n")
    client.put_object(Bucket="corp", Key="corpus/.ipynb_checkpoints/a-checkpoint.jsonl", Body=b'{"text": "x"}\n')
    yield "s3://corp"
    for obj in client.list_objects_v2(Bucket="corp").get("Contents", []):
        client.delete_object(Bucket="corp", Key=obj["Key"])
    client.delete_bucket(Bucket="corp")
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_bucket_prefix_is_read_as_a_directory(bucket):
    tasks = expand_source(SourceConfig(path=f"{bucket}/corpus/", label_field="label"))
    hidden = [t["rel"] for t in tasks if t["hidden"]]
    assert hidden == [".ipynb_checkpoints/a-checkpoint.jsonl"]
    recs = [r for t in tasks if not t["hidden"] for r in read_file(t, 1 << 20)]
    docs = [r for r in recs if r.get(S.STATUS) is None]
    assert sorted(d[S.LABEL] for d in docs) == ["business"] * 3 + ["sport", "tech"]
    assert all(d[S.PATH].startswith("s3://corp/corpus/") for d in docs)
    assert [r[S.REASON] for r in recs if r.get(S.STATUS) is not None] == ["malformed_json"]
    # a glob, and one object
    assert [t["rel"] for t in expand_source(SourceConfig(path=f"{bucket}/corpus/sub/*.csv"))] == ["c.csv"]
    assert len(expand_source(SourceConfig(path=f"{bucket}/corpus/a.jsonl"))) == 1
    with pytest.raises(ValueError, match="no such file, directory or glob match"):
        expand_source(SourceConfig(path=f"{bucket}/nothing-here.jsonl"))


def test_finetuning_and_evaluation_read_the_bucket(bucket):
    from pipeline.evaluate.run import LMEvalConfig, _lm_texts
    from pipeline.finetune.classify_data import read_labeled_rows

    bad: list = []
    rows = read_labeled_rows(f"{bucket}/corpus/a.jsonl", "text", "label", bad)
    assert len(rows) == 3 and {r["label"] for r in rows} == {"business"} and len(bad) == 1
    texts, unit, rejected, hidden = _lm_texts(LMEvalConfig(model="m", text_file=f"{bucket}/corpus/"))
    assert len(texts) == 5 and unit == "records" and rejected == ["malformed_json"] and hidden == 1


def test_a_store_that_cannot_be_reached_is_named_as_such(s3_endpoint, monkeypatch):
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(ValueError, match=r"sources\[0\] .*cannot reach s3://corp/x.jsonl: EndpointConnectionError"):
            expand_source(SourceConfig(path="s3://corp/x.jsonl"))
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
