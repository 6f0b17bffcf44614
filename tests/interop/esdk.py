#!/usr/bin/env python3
"""Interop helper: seal and open AWS Encryption SDK messages with the official Python SDK
(aws-encryption-sdk), so tests can check gpulink's Rust encoder against it both ways.

Always uses algorithm suite 0x0478 (AES_256_GCM_HKDF_SHA512_COMMIT_KEY, message format 2.0)
and the REQUIRE_ENCRYPT_REQUIRE_DECRYPT commitment policy, with a strict AWS KMS master key
provider for one key ARN. --endpoint points KMS at a local endpoint such as moto; without it
the normal AWS configuration is used.

  esdk.py encrypt --endpoint URL --key-arn ARN [--context k=v ...] [--frame-length N] \
      < plaintext > message
  esdk.py decrypt --endpoint URL --key-arn ARN [--context-out FILE] [--expect-context k=v ...] \
      < message > plaintext

decrypt prints the message's encryption context as JSON to stderr (or to --context-out) and
exits non-zero if decryption fails, the suite is not 0x0478, or --expect-context is given and
the context differs from it exactly.
"""
import argparse
import json
import os
import sys


def _parse_pairs(pairs):
    context = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit("context entries must be k=v, got %r" % pair)
        key, value = pair.split("=", 1)
        context[key] = value
    return context


def _provider(endpoint, key_arn):
    if endpoint:
        # botocore >= 1.31 honours per-service endpoint overrides from the environment.
        os.environ["AWS_ENDPOINT_URL_KMS"] = endpoint
        # A local KMS (moto) accepts any credentials; supply dummies only if none are set.
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    parts = key_arn.split(":")
    if len(parts) > 3 and parts[3]:
        os.environ.setdefault("AWS_DEFAULT_REGION", parts[3])

    import botocore.session
    import aws_encryption_sdk

    session = botocore.session.Session()
    return aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[key_arn], botocore_session=session)


def _client():
    import aws_encryption_sdk
    from aws_encryption_sdk.identifiers import CommitmentPolicy

    return aws_encryption_sdk.EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)


def cmd_encrypt(args):
    from aws_encryption_sdk.identifiers import Algorithm

    plaintext = sys.stdin.buffer.read()
    ciphertext, _header = _client().encrypt(
        source=plaintext,
        key_provider=_provider(args.endpoint, args.key_arn),
        encryption_context=_parse_pairs(args.context),
        algorithm=Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
        frame_length=args.frame_length,
    )
    sys.stdout.buffer.write(ciphertext)
    return 0


def cmd_decrypt(args):
    from aws_encryption_sdk.identifiers import Algorithm

    message = sys.stdin.buffer.read()
    try:
        plaintext, header = _client().decrypt(source=message, key_provider=_provider(args.endpoint, args.key_arn))
    except Exception as error:  # report the SDK's reason, never the data
        sys.stderr.write("decrypt failed: %s: %s\n" % (type(error).__name__, error))
        return 1
    if header.algorithm != Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY:
        sys.stderr.write("unexpected algorithm suite %s\n" % header.algorithm)
        return 1
    context = dict(header.encryption_context)
    context_json = json.dumps(context, sort_keys=True)
    if args.context_out:
        with open(args.context_out, "w") as handle:
            handle.write(context_json + "\n")
    else:
        sys.stderr.write(context_json + "\n")
    if args.expect_context is not None and context != _parse_pairs(args.expect_context):
        sys.stderr.write("encryption context differs from --expect-context\n")
        return 1
    sys.stdout.buffer.write(plaintext)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("encrypt", "decrypt"):
        p = sub.add_parser(name)
        p.add_argument("--endpoint", help="KMS endpoint URL (e.g. http://127.0.0.1:5000 for moto)")
        p.add_argument("--key-arn", required=True, help="KMS key ARN")
    enc = sub.choices["encrypt"]
    enc.add_argument("--context", action="append", metavar="K=V", help="encryption context entry")
    enc.add_argument("--frame-length", type=int, default=4096)
    dec = sub.choices["decrypt"]
    dec.add_argument("--context-out", metavar="FILE", help="write the context JSON here instead of stderr")
    dec.add_argument("--expect-context", action="append", metavar="K=V", help="require exactly this context")
    args = parser.parse_args(argv)
    return cmd_encrypt(args) if args.command == "encrypt" else cmd_decrypt(args)


if __name__ == "__main__":
    sys.exit(main())
