#!/usr/bin/env python3
"""An S3 server on loopback for the remote-memory tests: moto's server on 127.0.0.1 and a free port, a bucket, and an
object of --size random bytes put with boto3 (dummy credentials).

Writes the object's bytes to --data-file and prints one JSON line on stdout when ready:
  {"url": presigned GET URL, "missing_url": presigned GET URL of a key that does not exist, "port": N, "size": N,
   "etag": ETag}
then serves until stdin closes (the test process ended) or SIGTERM.
"""
import argparse
import json
import logging
import os
import random
import signal
import sys
import threading


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=4 << 20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--data-file", required=True)
    args = parser.parse_args()

    # Dummy credentials: moto accepts anything, and nothing may reach a real AWS endpoint.
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ[name] = value
    os.environ.pop("AWS_PROFILE", None)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    import boto3
    from botocore.config import Config
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = "http://127.0.0.1:%d" % port

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
    bucket, key = "uffd-remote", "object.bin"
    s3.create_bucket(Bucket=bucket)
    data = random.Random(args.seed).randbytes(args.size)
    etag = s3.put_object(Bucket=bucket, Key=key, Body=data)["ETag"]
    with open(args.data_file, "wb") as out:
        out.write(data)
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=3600)
    missing = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "missing.bin"}, ExpiresIn=3600)

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print(json.dumps({"url": url, "missing_url": missing, "port": port, "size": len(data), "etag": etag}), flush=True)
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except Exception:
        pass
    os._exit(0)


if __name__ == "__main__":
    main()
