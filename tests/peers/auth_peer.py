#!/usr/bin/env python3
"""Independent peer for tests/auth.rs: mints JWTs with PyJWT (+cryptography) and signs
requests with botocore's SigV4 signer, so ringgate is checked against code it shares nothing
with.

Reads one JSON object from stdin: {"dir": "...", "jobs": [...]}; writes a JSON list with one
result per job. Jobs:
  {"op": "keys"}                      -> writes DIR/jwks.json (public keys) and private keys
                                         DIR/<kid>.pem for kids rsa, ec256, ec384, ed
  {"op": "jwt", "alg": "RS256", "kid": "rsa"|null, "claims": {...},
   "secret": "..."?, "key_file": "..."?, "headers": {...}?}
                                      -> the token (HS* use "secret"; others DIR/<kid>.pem or key_file)
  {"op": "jwks", "kids": [...], "out": "file"}  -> writes a JWKS with those kids' public keys
  {"op": "sign", "method": "GET", "url": "...", "headers": {...}, "body": "...",
   "access_key": "...", "secret_key": "...", "region": "...", "service": "...",
   "time": "20261125T140000Z"?, "presign": 300?, "token": "session token"?}
                                      -> {"headers": {...}} or {"url": "..."} (presigned)
"""
import datetime
import json
import os
import sys

import jwt
from jwt.algorithms import RSAAlgorithm, ECAlgorithm, OKPAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
import botocore.auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


def pem(key):
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_jwk(kid, key):
    pub = key.public_key()
    if isinstance(key, rsa.RSAPrivateKey):
        j = json.loads(RSAAlgorithm.to_jwk(pub))
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        j = json.loads(ECAlgorithm.to_jwk(pub))
    else:
        j = json.loads(OKPAlgorithm.to_jwk(pub))
    j["kid"] = kid
    j["use"] = "sig"
    return j


def load(d, kid):
    with open(os.path.join(d, kid + ".pem"), "rb") as f:
        return serialization.load_pem_private_key(f.read(), None)


def main():
    req = json.load(sys.stdin)
    d = req["dir"]
    out = []
    for job in req["jobs"]:
        op = job["op"]
        if op == "keys":
            keys = {
                "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
                "rsa2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
                "ec256": ec.generate_private_key(ec.SECP256R1()),
                "ec384": ec.generate_private_key(ec.SECP384R1()),
                "ed": ed25519.Ed25519PrivateKey.generate(),
            }
            for kid, k in keys.items():
                with open(os.path.join(d, kid + ".pem"), "wb") as f:
                    f.write(pem(k))
                with open(os.path.join(d, kid + ".pub.pem"), "wb") as f:
                    f.write(
                        k.public_key().public_bytes(
                            serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo,
                        )
                    )
            jwks = {"keys": [public_jwk(k, v) for k, v in keys.items() if k != "rsa2"]}
            with open(os.path.join(d, "jwks.json"), "w") as f:
                json.dump(jwks, f)
            out.append("ok")
        elif op == "jwks":
            jwks = {"keys": [public_jwk(k, load(d, k)) for k in job["kids"]]}
            with open(os.path.join(d, job["out"]), "w") as f:
                json.dump(jwks, f)
            out.append("ok")
        elif op == "jwt":
            alg = job["alg"]
            headers = dict(job.get("headers") or {})
            if job.get("kid"):
                headers["kid"] = job["kid"]
            if job.get("raw_hs_key_file"):
                # HS256 keyed with a file's bytes, built by hand (PyJWT refuses PEM keys as
                # HMAC secrets): the classic RS/HS key-confusion forgery.
                import base64, hashlib, hmac as _hmac
                b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")
                hdr = {"alg": "HS256", "typ": "JWT"}
                hdr.update(headers)
                signing = b64(json.dumps(hdr).encode()) + b"." + b64(json.dumps(job["claims"]).encode())
                with open(job["raw_hs_key_file"], "rb") as f:
                    k = f.read()
                sig = b64(_hmac.new(k, signing, hashlib.sha256).digest())
                out.append((signing + b"." + sig).decode())
                continue
            if "secret" in job:
                key = job["secret"]
            elif "key_file" in job:
                with open(job["key_file"], "rb") as f:
                    key = f.read()
            else:
                key = load(d, job["sign_kid"] if "sign_kid" in job else job["kid"])
            out.append(jwt.encode(job["claims"], key, algorithm=alg, headers=headers))
        elif op == "sign":
            creds = Credentials(job["access_key"], job["secret_key"], job.get("token"))
            r = AWSRequest(
                method=job["method"],
                url=job["url"],
                headers=job.get("headers") or {},
                data=job.get("body", "").encode(),
                params=job.get("params") or {},
            )
            if "time" in job:
                t = datetime.datetime.strptime(job["time"], "%Y%m%dT%H%M%SZ").replace(
                    tzinfo=datetime.timezone.utc
                )
                botocore.auth.get_current_datetime = lambda: t
            if "presign" in job:
                signer = botocore.auth.SigV4QueryAuth(
                    creds, job["service"], job["region"], expires=job["presign"]
                )
                signer.add_auth(r)
                out.append({"url": r.url})
            else:
                signer = botocore.auth.SigV4Auth(creds, job["service"], job["region"])
                signer.add_auth(r)
                # The URL as botocore sends it (its `params` form-encoded: a space as `+`).
                out.append({"headers": dict(r.headers.items()), "url": r.prepare().url})
        else:
            raise SystemExit("unknown op " + op)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
