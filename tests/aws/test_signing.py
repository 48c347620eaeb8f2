"""Code signing end to end with the unmodified `aws` CLI (and boto3 where the CLI cannot
send a request): certificates imported into ACM, signer platforms, profiles and signing
jobs, CreateOTAUpdate with each codeSigning variant, and `updraft sign` /
`updraft signer create-certificate`.

Every signature is verified independently with `cryptography` against the certificate,
tampered firmware must fail verification, every named failure (missing object, canceled
profile, key that does not match the certificate) fails the job with a reason and writes
nothing, and no API returns a private key.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import time

import pytest
import requests
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import ROLE_ARN, PgDatabase, Server, firmware_bytes, unique, wait_for
from test_device_jobs import Device
from test_device_streams import json_or_raw

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
CERT_ARN_RE = re.compile(r"^arn:aws:acm:[a-z0-9-]+:\d{12}:certificate/[0-9a-f-]{36}$")
CERTNAME = "/certs/ota_signer.pem"


# ----------------------------------------------------------------------- helpers


class Identity:
    """A code-signing key and certificate made with `cryptography`, written as PEM files."""

    def __init__(self, directory, name: str, *, key=None, days: int = 365, start_days_ago: int = 1):
        self.key = key or ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=start_days_ago))
            .not_valid_after(now + datetime.timedelta(days=days - start_days_ago))
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        self.cert_path = directory / f"{name}-cert.pem"
        self.key_path = directory / f"{name}-key.pem"
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM).decode()
        self.key_pem = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        self.cert_path.write_text(self.cert_pem)
        self.key_path.write_text(self.key_pem)

    def verify(self, data: bytes, signature: bytes) -> None:
        """Raises InvalidSignature unless `signature` (DER) is this certificate's over `data`."""
        verify_with_certificate(self.cert_pem, data, signature)

    def key_secrets(self) -> list[str]:
        """Texts that would only appear in a response that leaked the private key."""
        body = "".join(l for l in self.key_pem.splitlines() if "-----" not in l)
        der = self.key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        secret = self.key.private_numbers().private_value.to_bytes(32, "big")
        return [body[:40], base64.b64encode(der).decode()[:40], secret.hex(), base64.b64encode(secret).decode()]


def verify_with_certificate(cert_pem: str, data: bytes, signature: bytes) -> None:
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    cert.public_key().verify(signature, data, ec.ECDSA(hashes.SHA256()))


def assert_verifies(cert_pem: str, data: bytes, signature_b64: str) -> None:
    """The signature verifies over `data`, and not over tampered data."""
    sig = base64.b64decode(signature_b64)
    assert sig[0] == 0x30, "signatures are ASN.1 DER"
    verify_with_certificate(cert_pem, data, sig)
    tampered = bytearray(data)
    tampered[len(tampered) // 2] ^= 0x01
    with pytest.raises(InvalidSignature):
        verify_with_certificate(cert_pem, bytes(tampered), sig)
    with pytest.raises(InvalidSignature):
        verify_with_certificate(cert_pem, data + b"\x00", sig)


def client_error(fn, code: str, status: int) -> ClientError:
    with pytest.raises(ClientError) as ei:
        fn()
    resp = ei.value.response
    got = (resp["Error"].get("Code"), resp["ResponseMetadata"]["HTTPStatusCode"])
    assert got == (code, status), f"expected {code} {status}, got {got}: {resp['Error'].get('Message')}"
    return ei.value


def cli_error(server, code: str, *args) -> str:
    got, stderr = server.aws_fail(*args)
    assert got == code, f"expected {code}, got {got}: {stderr}"
    return stderr


def signed_request(server, service: str, method: str, path: str, body: bytes = b"", headers=None):
    ak, sk = server.credentials()
    req = AWSRequest(method=method, url=server.endpoint + path, data=body, headers=headers or {})
    SigV4Auth(Credentials(ak, sk), service, server.region).add_auth(req)
    p = req.prepare()
    return requests.request(method, p.url, headers=dict(p.headers), data=p.body, timeout=30)


def import_certificate(server, ident: Identity) -> str:
    out = server.aws(
        "acm", "import-certificate",
        "--certificate", f"fileb://{ident.cert_path}",
        "--private-key", f"fileb://{ident.key_path}",
    )
    arn = out["CertificateArn"]
    assert CERT_ARN_RE.match(arn), arn
    return arn


def put_profile(server, name: str, cert_arn: str, certname: str = CERTNAME) -> dict:
    return server.aws(
        "signer", "put-signing-profile", "--profile-name", name,
        "--signing-material", f"certificateArn={cert_arn}",
        "--platform-id", "AmazonFreeRTOS-Default",
        "--signing-parameters", f"certname={certname}",
    )


def start_job(server, bucket: str, key: str, version: str, profile: str, prefix: str = "signed/", *extra) -> str:
    out = server.aws(
        "signer", "start-signing-job",
        "--source", f"s3={{bucketName={bucket},key={key},version={version}}}",
        # The seed's form without a prefix: 's3={bucketName=...}'.
        "--destination", f"s3={{bucketName={bucket},prefix={prefix}}}" if prefix else f"s3={{bucketName={bucket}}}",
        "--profile-name", profile, *extra,
    )
    assert UUID_RE.match(out["jobId"]), out
    assert re.fullmatch(r"\d{12}", out["jobOwner"]), out
    return out["jobId"]


def wait_job(server, job_id: str) -> dict:
    def done():
        j = server.aws("signer", "describe-signing-job", "--job-id", job_id)
        return j if j["status"] != "InProgress" else None

    return wait_for(done, timeout=30, interval=0.1, what=f"signing job {job_id}")


def keys_under(server, bucket: str, prefix: str) -> list[str]:
    out = server.aws("s3api", "list-object-versions", "--bucket", bucket, "--prefix", prefix)
    return [v["Key"] for v in out.get("Versions", [])] + [m["Key"] for m in out.get("DeleteMarkers", [])]


def get_object(server, bucket: str, key: str, dest, version: str | None = None) -> bytes:
    args = ["s3api", "get-object", "--bucket", bucket, "--key", key]
    if version:
        args += ["--version-id", version]
    server.aws(*args, str(dest))
    return dest.read_bytes()


def run_sql(server, sql: str) -> None:
    """Changes the store behind the server's back (to simulate damage it must survive)."""
    if server.database:
        psql = shutil.which("psql")
        if not psql:
            pytest.skip("psql is needed to change the PostgreSQL store")
        subprocess.run([psql, server.database, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql], check=True,
                       capture_output=True, timeout=30)
    else:
        con = sqlite3.connect(server.data_dir / "updraft.db", timeout=30)
        try:
            con.execute(sql)
            con.commit()
        finally:
            con.close()


def query_sql(server, sql: str) -> list[tuple]:
    if server.database:
        psql = shutil.which("psql")
        if not psql:
            pytest.skip("psql is needed to read the PostgreSQL store")
        out = subprocess.run([psql, server.database, "-At", "-F", "\t", "-c", sql], check=True,
                             capture_output=True, text=True, timeout=30).stdout
        return [tuple(line.split("\t")) for line in out.splitlines() if line]
    con = sqlite3.connect(server.data_dir / "updraft.db", timeout=30)
    try:
        return list(con.execute(sql))
    finally:
        con.close()


def cert_id(arn: str) -> str:
    return arn.rsplit("/", 1)[1]


def wait_ota(server, ota_id: str, want: str = "CREATE_COMPLETE") -> dict:
    def done():
        info = server.aws("iot", "get-ota-update", "--ota-update-id", ota_id)["otaUpdateInfo"]
        return info if info["otaUpdateStatus"] in ("CREATE_COMPLETE", "CREATE_FAILED") else None

    info = wait_for(done, timeout=60, interval=0.2, what=f"OTA update {ota_id}")
    assert info["otaUpdateStatus"] == want, info
    return info


def create_ota(server, tmp_path, thing_arn: str, files: list, protocols=("MQTT",)) -> str:
    ota_id = unique("ota")
    path = tmp_path / f"{ota_id}.json"
    path.write_text(json.dumps(files))
    server.aws(
        "iot", "create-ota-update", "--ota-update-id", ota_id, "--targets", thing_arn,
        "--protocols", *protocols, "--files", f"file://{path}", "--role-arn", ROLE_ARN,
    )
    return ota_id


def job_document(server, ota_id: str) -> dict:
    return json.loads(server.aws("iot", "get-job-document", "--job-id", f"AFR_OTA-{ota_id}")["document"])["afr_ota"]


def device_stream_download(server, thing: str) -> tuple[dict, bytes]:
    """What a device gets: its next job's document and the file, block by block over MQTT."""
    import cbor2

    dev = Device(server, thing)
    try:
        _, body = dev.request("$next/get")
        doc = body["execution"]["jobDocument"]["afr_ota"]
        f = doc["files"][0]
        base = f"$aws/things/{thing}/streams/{doc['streamname']}"
        dev.client.subscribe(f"{base}/#", qos=0)
        time.sleep(0.2)
        block = 4096
        nblocks = (f["filesize"] + block - 1) // block
        got: dict[int, bytes] = {}
        for offset in range(0, nblocks, 16):
            dev.publish(f"{base}/get/cbor", cbor2.dumps({"f": f["fileid"], "l": block, "o": offset, "n": 16}))
            for _ in range(min(16, nblocks - offset)):
                msg = cbor2.loads(json_or_raw(dev, f"{base}/data/cbor"))
                got[msg["i"]] = msg["p"]
        return f, b"".join(got[i] for i in range(nblocks))
    finally:
        dev.close()


# ----------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("signing")


@pytest.fixture(scope="module")
def ident(work):
    return Identity(work / "ident", "updraft-ota-signer")


@pytest.fixture(scope="module")
def cert_arn(server, ident):
    return import_certificate(server, ident)


@pytest.fixture(scope="module")
def fw(server, work):
    """A versioned bucket holding a firmware image."""
    bucket = unique("sig")
    server.aws("s3", "mb", f"s3://{bucket}")
    server.aws("s3api", "put-bucket-versioning", "--bucket", bucket, "--versioning-configuration", "Status=Enabled")
    data = firmware_bytes(70_001)
    path = work / "firmware.bin"
    path.write_bytes(data)
    out = server.aws("s3api", "put-object", "--bucket", bucket, "--key", "fw/firmware.bin", "--body", str(path))
    return {"bucket": bucket, "key": "fw/firmware.bin", "version": out["VersionId"], "data": data, "path": path}


@pytest.fixture(scope="module")
def profile(server, cert_arn):
    name = "ota_" + unique("p").replace("-", "_")
    put_profile(server, name, cert_arn)
    return name


@pytest.fixture
def thing_arn(server):
    name = unique("dev")
    return server.aws("iot", "create-thing", "--thing-name", name)["thingArn"]


@pytest.fixture(scope="module")
def signer_client(server):
    return server.client("signer")


@pytest.fixture(scope="module")
def acm_client(server):
    return server.client("acm")


# ----------------------------------------------------------------------- ACM


def test_import_and_describe_certificate(server, ident, cert_arn):
    c = server.aws("acm", "describe-certificate", "--certificate-arn", cert_arn)["Certificate"]
    assert c["CertificateArn"] == cert_arn
    assert c["KeyAlgorithm"] == "EC_prime256v1"
    assert c["Status"] == "ISSUED" and c["Type"] == "IMPORTED"
    assert c["Subject"] == "CN=updraft-ota-signer" and c["Issuer"] == "CN=updraft-ota-signer"
    assert c["DomainName"] == "updraft-ota-signer"
    assert c["SignatureAlgorithm"] == "SHA256WITHECDSA"
    assert c["Serial"].replace(":", "") == format(ident.cert.serial_number, "x").rjust(
        len(c["Serial"].replace(":", "")), "0"
    )
    assert int(c["NotBefore"]) == int(ident.cert.not_valid_before_utc.timestamp())
    assert int(c["NotAfter"]) == int(ident.cert.not_valid_after_utc.timestamp())
    assert {"Name": "CODE_SIGNING", "OID": "1.3.6.1.5.5.7.3.3"} in c["ExtendedKeyUsages"]
    assert {"Name": "DIGITAL_SIGNATURE"} in c["KeyUsages"]
    assert "ImportedAt" in c
    # ACM lists only RSA_1024/RSA_2048 certificates unless keyTypes says otherwise.
    default = server.aws("acm", "list-certificates")["CertificateSummaryList"]
    assert cert_arn not in [s["CertificateArn"] for s in default]
    listed = server.aws("acm", "list-certificates", "--includes", "keyTypes=EC_prime256v1")["CertificateSummaryList"]
    mine = [s for s in listed if s["CertificateArn"] == cert_arn]
    assert len(mine) == 1
    assert mine[0]["KeyAlgorithm"] == "EC_prime256v1" and mine[0]["Status"] == "ISSUED"
    assert mine[0]["ExtendedKeyUsages"] == ["CODE_SIGNING"]
    issued = server.aws(
        "acm", "list-certificates", "--includes", "keyTypes=EC_prime256v1", "--certificate-statuses", "EXPIRED"
    )["CertificateSummaryList"]
    assert cert_arn not in [s["CertificateArn"] for s in issued]


def test_list_certificates_pages_and_rsa(server, work, acm_client):
    rsa_ident = Identity(work / "rsa", "updraft-rsa", key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    rsa_arn = import_certificate(server, rsa_ident)
    d = server.aws("acm", "describe-certificate", "--certificate-arn", rsa_arn)["Certificate"]
    assert d["KeyAlgorithm"] == "RSA_2048" and d["SignatureAlgorithm"] == "SHA256WITHRSA"
    assert rsa_arn in [s["CertificateArn"] for s in server.aws("acm", "list-certificates")["CertificateSummaryList"]]
    for i in range(3):
        import_certificate(server, Identity(work / "many", f"updraft-many-{i}"))
    everything = {"keyTypes": ["RSA_2048", "EC_prime256v1"]}
    seen, token, pages = [], None, 0
    while True:
        kw = {"Includes": everything, "MaxItems": 2}
        if token:
            kw["NextToken"] = token
        page = acm_client.list_certificates(**kw)
        assert len(page["CertificateSummaryList"]) <= 2
        seen += [s["CertificateArn"] for s in page["CertificateSummaryList"]]
        pages += 1
        token = page.get("NextToken")
        if not token:
            break
    assert pages >= 3 and len(seen) == len(set(seen)) and rsa_arn in seen
    desc = acm_client.list_certificates(Includes=everything, SortBy="CREATED_AT", SortOrder="DESCENDING")
    assert [s["CertificateArn"] for s in desc["CertificateSummaryList"]] == list(reversed(
        [s["CertificateArn"] for s in acm_client.list_certificates(Includes=everything)["CertificateSummaryList"]]
    ))
    server.aws("acm", "delete-certificate", "--certificate-arn", rsa_arn)
    cli_error(server, "ResourceNotFoundException", "acm", "describe-certificate", "--certificate-arn", rsa_arn)


def test_import_refuses_bad_material(server, work, ident, acm_client):
    other = Identity(work / "other", "updraft-other")
    # A key that is not the certificate's.
    mismatch = work / "mismatch-key.pem"
    mismatch.write_text(other.key_pem)
    err = cli_error(server, "ValidationException", "acm", "import-certificate",
                    "--certificate", f"fileb://{ident.cert_path}", "--private-key", f"fileb://{mismatch}")
    assert "does not match" in err
    # An encrypted key.
    enc = work / "encrypted-key.pem"
    enc.write_bytes(ident.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    ))
    err = cli_error(server, "ValidationException", "acm", "import-certificate",
                    "--certificate", f"fileb://{ident.cert_path}", "--private-key", f"fileb://{enc}")
    assert "encrypted" in err
    # Not a certificate.
    junk = work / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    cli_error(server, "ValidationException", "acm", "import-certificate",
              "--certificate", f"fileb://{junk}", "--private-key", f"fileb://{ident.key_path}")
    # An expired certificate.
    old = Identity(work / "old", "updraft-expired", days=10, start_days_ago=20)
    err = cli_error(server, "ValidationException", "acm", "import-certificate",
                    "--certificate", f"fileb://{old.cert_path}", "--private-key", f"fileb://{old.key_path}")
    assert "not valid now" in err
    # Tags: reserved prefix, too many.
    client_error(lambda: acm_client.import_certificate(
        Certificate=ident.cert_pem.encode(), PrivateKey=ident.key_pem.encode(), Tags=[{"Key": "aws:x", "Value": "y"}]
    ), "InvalidTagException", 400)
    client_error(lambda: acm_client.import_certificate(
        Certificate=ident.cert_pem.encode(), PrivateKey=ident.key_pem.encode(),
        Tags=[{"Key": f"k{i}", "Value": "v"} for i in range(51)],
    ), "TooManyTagsException", 400)
    # ARNs.
    cli_error(server, "InvalidArnException", "acm", "describe-certificate", "--certificate-arn", "arn:aws:acm:nope:1:x")
    missing = f"arn:aws:acm:{server.region}:{cert_account(server)}:certificate/00000000-0000-0000-0000-000000000000"
    cli_error(server, "ResourceNotFoundException", "acm", "describe-certificate", "--certificate-arn", missing)
    cli_error(server, "ResourceNotFoundException", "acm", "delete-certificate", "--certificate-arn", missing)
    client_error(lambda: acm_client.list_certificates(Includes={"keyTypes": ["DSA_1024"]}), "InvalidArgsException", 400)
    client_error(lambda: acm_client.list_certificates(MaxItems=1001), "ValidationException", 400)


def cert_account(server) -> str:
    arn = server.aws("iot", "create-thing", "--thing-name", unique("acct"))["thingArn"]
    return arn.split(":")[4]


def test_reimport_keeps_the_arn(server, work, acm_client):
    first = Identity(work / "re1", "updraft-reimport")
    arn = import_certificate(server, first)
    second = Identity(work / "re2", "updraft-reimport-2")
    out = server.aws("acm", "import-certificate", "--certificate-arn", arn,
                     "--certificate", f"fileb://{second.cert_path}", "--private-key", f"fileb://{second.key_path}")
    assert out["CertificateArn"] == arn
    d = server.aws("acm", "describe-certificate", "--certificate-arn", arn)["Certificate"]
    assert d["Subject"] == "CN=updraft-reimport-2"
    client_error(lambda: acm_client.import_certificate(
        CertificateArn=arn, Certificate=second.cert_pem.encode(), PrivateKey=second.key_pem.encode(),
        Tags=[{"Key": "k", "Value": "v"}],
    ), "ValidationException", 400)


def test_acm_wire_shape(server):
    """json 1.1: HTTP 400, `__type` in the body, application/x-amz-json-1.1."""
    arn = f"arn:aws:acm:{server.region}:{cert_account(server)}:certificate/00000000-0000-0000-0000-000000000001"
    r = signed_request(server, "acm", "POST", "/", json.dumps({"CertificateArn": arn}).encode(), {
        "X-Amz-Target": "CertificateManager.DescribeCertificate",
        "Content-Type": "application/x-amz-json-1.1",
    })
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/x-amz-json-1.1"
    body = r.json()
    assert body["__type"] == "ResourceNotFoundException" and arn in body["message"]
    r = signed_request(server, "acm", "POST", "/", b"{}", {"X-Amz-Target": "CertificateManager.RequestCertificate"})
    assert r.status_code == 400 and r.json()["__type"] == "UnknownOperationException"
    # Unsigned: refused in ACM's shape too.
    r = requests.post(server.endpoint + "/", data=b"{}", headers={
        "X-Amz-Target": "CertificateManager.ListCertificates", "Content-Type": "application/x-amz-json-1.1",
    }, timeout=30)
    assert r.status_code == 403 and r.json()["__type"] == "MissingAuthenticationTokenException"


def test_updraft_create_certificate_then_import(server, work):
    out_dir = work / "quickstart"
    binary = server.binary
    p = subprocess.run([binary, "signer", "create-certificate", "--out-dir", str(out_dir), "--common-name", "Quick Start"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    cert_path, key_path = out_dir / "cert.pem", out_dir / "key.pem"
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.subject.rfc4514_string() == "CN=Quick Start"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CODE_SIGNING in eku
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    # It refuses to overwrite without --force.
    again = subprocess.run([binary, "signer", "create-certificate", "--out-dir", str(out_dir)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "exists" in again.stderr
    arn = server.aws("acm", "import-certificate", "--certificate", f"fileb://{cert_path}",
                     "--private-key", f"fileb://{key_path}")["CertificateArn"]
    assert server.aws("acm", "describe-certificate", "--certificate-arn", arn)["Certificate"]["Subject"] == "CN=Quick Start"


# ----------------------------------------------------------------------- platforms


def test_signing_platforms(server, signer_client):
    platforms = server.aws("signer", "list-signing-platforms")["platforms"]
    by_id = {p["platformId"]: p for p in platforms}
    d = by_id["AmazonFreeRTOS-Default"]
    assert d == {
        "platformId": "AmazonFreeRTOS-Default",
        "displayName": "Amazon FreeRTOS SHA256-ECDSA",
        "partner": "AmazonFreeRTOS",
        "target": "SHA256-ECDSA",
        "category": "AWS",
        "signingConfiguration": {
            "encryptionAlgorithmOptions": {"allowedValues": ["ECDSA"], "defaultValue": "ECDSA"},
            "hashAlgorithmOptions": {"allowedValues": ["SHA256"], "defaultValue": "SHA256"},
        },
        "signingImageFormat": {"supportedFormats": ["JSONEmbedded"], "defaultFormat": "JSONEmbedded"},
        "maxSizeInMB": 16,
        "revocationSupported": False,
    }
    ti = by_id["AmazonFreeRTOS-TI-CC3220SF"]
    assert ti["target"] == "SHA1-RSA-TISHA1"
    assert ti["signingConfiguration"]["hashAlgorithmOptions"]["defaultValue"] == "SHA1"
    assert server.aws("signer", "get-signing-platform", "--platform-id", "AmazonFreeRTOS-Default") == d
    assert [p["platformId"] for p in server.aws("signer", "list-signing-platforms", "--target", "SHA256-ECDSA")["platforms"]] == [
        "AmazonFreeRTOS-Default"
    ]
    assert server.aws("signer", "list-signing-platforms", "--partner", "nobody")["platforms"] == []
    first = signer_client.list_signing_platforms(maxResults=1)
    assert len(first["platforms"]) == 1 and first["nextToken"]
    second = signer_client.list_signing_platforms(maxResults=1, nextToken=first["nextToken"])
    assert second["platforms"][0]["platformId"] != first["platforms"][0]["platformId"]
    cli_error(server, "ResourceNotFoundException", "signer", "get-signing-platform", "--platform-id", "NoSuchPlatform")
    client_error(lambda: signer_client.list_signing_platforms(maxResults=26), "ValidationException", 400)


# ----------------------------------------------------------------------- profiles


def test_profiles_put_get_list_cancel(server, cert_arn):
    name = "prof_" + unique("x").replace("-", "_")
    out = put_profile(server, name, cert_arn)
    assert re.fullmatch(r"[A-Za-z0-9]{10}", out["profileVersion"])
    assert out["arn"].endswith(f":/signing-profiles/{name}") and out["arn"].startswith("arn:aws:signer:")
    assert out["profileVersionArn"] == f"{out['arn']}/{out['profileVersion']}"
    got = server.aws("signer", "get-signing-profile", "--profile-name", name)
    assert got["profileName"] == name and got["status"] == "Active"
    assert got["profileVersion"] == out["profileVersion"] and got["profileVersionArn"] == out["profileVersionArn"]
    assert got["signingMaterial"] == {"certificateArn": cert_arn}
    assert got["platformId"] == "AmazonFreeRTOS-Default"
    assert got["platformDisplayName"] == "Amazon FreeRTOS SHA256-ECDSA"
    assert got["signingParameters"] == {"certname": CERTNAME}
    assert got["signatureValidityPeriod"] == {"value": 135, "type": "MONTHS"}
    assert name in [p["profileName"] for p in server.aws("signer", "list-signing-profiles")["profiles"]]
    # The certificate is in use.
    d = server.aws("acm", "describe-certificate", "--certificate-arn", cert_arn)["Certificate"]
    assert out["arn"] in d["InUseBy"]
    # A name is used once.
    cli_error(server, "ConflictException", "signer", "put-signing-profile", "--profile-name", name,
              "--signing-material", f"certificateArn={cert_arn}", "--platform-id", "AmazonFreeRTOS-Default",
              "--signing-parameters", "certname=/x")
    server.aws("signer", "cancel-signing-profile", "--profile-name", name)
    assert server.aws("signer", "get-signing-profile", "--profile-name", name)["status"] == "Canceled"
    assert name not in [p["profileName"] for p in server.aws("signer", "list-signing-profiles")["profiles"]]
    inc = server.aws("signer", "list-signing-profiles", "--include-canceled")["profiles"]
    assert [p["status"] for p in inc if p["profileName"] == name] == ["Canceled"]
    only = server.aws("signer", "list-signing-profiles", "--statuses", "Canceled")["profiles"]
    assert name in [p["profileName"] for p in only] and all(p["status"] == "Canceled" for p in only)
    server.aws("signer", "cancel-signing-profile", "--profile-name", name)  # again: no change, no error
    cli_error(server, "ConflictException", "signer", "put-signing-profile", "--profile-name", name,
              "--signing-material", f"certificateArn={cert_arn}", "--platform-id", "AmazonFreeRTOS-Default",
              "--signing-parameters", "certname=/x")
    cli_error(server, "ResourceNotFoundException", "signer", "cancel-signing-profile", "--profile-name", "no_such_profile")


def test_delete_certificate_in_use(server, work):
    ident = Identity(work / "inuse", "updraft-in-use")
    arn = import_certificate(server, ident)
    name = "inuse_" + unique("u").replace("-", "_")
    put_profile(server, name, arn)
    listed = server.aws("acm", "list-certificates", "--includes", "keyTypes=EC_prime256v1")["CertificateSummaryList"]
    assert [s["InUse"] for s in listed if s["CertificateArn"] == arn] == [True]
    err = cli_error(server, "ResourceInUseException", "acm", "delete-certificate", "--certificate-arn", arn)
    assert name in err
    assert server.aws("acm", "describe-certificate", "--certificate-arn", arn)["Certificate"]["CertificateArn"] == arn
    server.aws("signer", "cancel-signing-profile", "--profile-name", name)
    server.aws("acm", "delete-certificate", "--certificate-arn", arn)
    cli_error(server, "ResourceNotFoundException", "acm", "describe-certificate", "--certificate-arn", arn)


def test_profile_pagination_and_filters(server, cert_arn, signer_client):
    names = ["pg_" + unique("p").replace("-", "_") for _ in range(4)]
    for n in names:
        put_profile(server, n, cert_arn)
    seen, token = [], None
    while True:
        kw = {"maxResults": 1}
        if token:
            kw["nextToken"] = token
        page = signer_client.list_signing_profiles(**kw)
        assert len(page["profiles"]) <= 1
        seen += [p["profileName"] for p in page["profiles"]]
        token = page.get("nextToken")
        if not token:
            break
    assert set(names) <= set(seen) and len(seen) == len(set(seen))
    assert server.aws("signer", "list-signing-profiles", "--platform-id", "AmazonFreeRTOS-TI-CC3220SF")["profiles"] == []
    client_error(lambda: signer_client.list_signing_profiles(maxResults=26), "ValidationException", 400)
    client_error(lambda: signer_client.list_signing_profiles(statuses=["Gone"]), "ValidationException", 400)
    client_error(lambda: signer_client.list_signing_profiles(nextToken="%%%"), "ValidationException", 400)


def test_profile_validation(server, cert_arn, signer_client, work):
    raw = server.client("signer", parameter_validation=False)

    def put(**kw):
        args = dict(profileName="val_" + unique("v").replace("-", "_"), platformId="AmazonFreeRTOS-Default",
                    signingMaterial={"certificateArn": cert_arn}, signingParameters={"certname": "/c"})
        args.update(kw)
        return raw.put_signing_profile(**args)

    client_error(lambda: put(profileName="has-hyphen"), "ValidationException", 400)
    client_error(lambda: put(profileName="x" * 65), "ValidationException", 400)
    e = client_error(lambda: put(signingMaterial=None), "ValidationException", 400)
    assert "signing material cannot be null" in str(e)
    client_error(lambda: put(platformId="NoSuchPlatform"), "ResourceNotFoundException", 404)
    missing = cert_arn.rsplit("/", 1)[0] + "/00000000-0000-0000-0000-000000000000"
    client_error(lambda: put(signingMaterial={"certificateArn": missing}), "ResourceNotFoundException", 404)
    client_error(lambda: put(signingMaterial={"certificateArn": "not-an-arn"}), "ValidationException", 400)
    e = client_error(lambda: put(platformId="AmazonFreeRTOS-TI-CC3220SF"), "ValidationException", 400)
    assert "SHA-1" in str(e)
    e = client_error(lambda: put(signingParameters={}), "ValidationException", 400)
    assert "certname" in str(e)
    client_error(lambda: put(signatureValidityPeriod={"value": 136, "type": "MONTHS"}), "ValidationException", 400)
    client_error(lambda: put(signatureValidityPeriod={"value": 0, "type": "DAYS"}), "ValidationException", 400)
    client_error(lambda: put(signatureValidityPeriod={"value": 1, "type": "WEEKS"}), "ValidationException", 400)
    client_error(lambda: put(tags={"aws:reserved": "x"}), "ValidationException", 400)
    client_error(lambda: put(overrides={"signingConfiguration": {"encryptionAlgorithm": "RSA"}}), "ValidationException", 400)
    client_error(lambda: put(overrides={"signingImageFormat": "JSONDetached"}), "ValidationException", 400)
    # An RSA certificate cannot make the platform's ECDSA signatures.
    rsa_ident = Identity(work / "rsa-prof", "updraft-rsa-prof",
                         key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    rsa_arn = import_certificate(server, rsa_ident)
    e = client_error(lambda: put(signingMaterial={"certificateArn": rsa_arn}), "ValidationException", 400)
    assert "ECDSA" in str(e)
    # A valid profile with every optional member.
    name = "full_" + unique("f").replace("-", "_")
    put(profileName=name, signatureValidityPeriod={"value": 2, "type": "YEARS"}, tags={"team": "fw"},
        overrides={"signingConfiguration": {"hashAlgorithm": "SHA256"}, "signingImageFormat": "JSONEmbedded"})
    got = signer_client.get_signing_profile(profileName=name)
    assert got["signatureValidityPeriod"] == {"value": 2, "type": "YEARS"} and got["tags"] == {"team": "fw"}
    assert got["overrides"]["signingImageFormat"] == "JSONEmbedded"
    client_error(lambda: signer_client.get_signing_profile(profileName="no_such_profile"), "ResourceNotFoundException", 404)
    client_error(lambda: signer_client.get_signing_profile(profileName=name, profileOwner="abcdefghijkl"),
                 "ValidationException", 400)
    client_error(lambda: signer_client.get_signing_profile(profileName=name, profileOwner="999999999999"),
                 "ResourceNotFoundException", 404)
    # Nothing was created by the failures: only the valid profile is new.
    names = {p["profileName"] for p in signer_client.list_signing_profiles(includeCanceled=True)["profiles"]}
    assert not {"has_hyphen"} & names


def test_signer_wire_shape(server):
    """signer errors carry `code` in the body as well as x-amzn-ErrorType."""
    r = signed_request(server, "signer", "GET", "/signing-profiles/no_such_profile")
    assert r.status_code == 404
    assert r.headers["x-amzn-ErrorType"] == "ResourceNotFoundException"
    body = r.json()
    assert body["code"] == "ResourceNotFoundException" and body["message"]
    r = signed_request(server, "signer", "GET", "/signing-jobs?maxResults=0")
    assert r.status_code == 400 and r.json()["code"] == "ValidationException"
    r = requests.get(server.endpoint + "/signing-profiles", timeout=30)
    assert r.status_code == 403 and r.json()["code"] == "MissingAuthenticationTokenException"
    assert r.headers["x-amzn-ErrorType"] == "MissingAuthenticationTokenException"


# ----------------------------------------------------------------------- signing jobs


def test_signing_job_flow(server, fw, profile, ident, cert_arn, work):
    job_id = start_job(server, fw["bucket"], fw["key"], fw["version"], profile)
    # The waiter polls DescribeSigningJob; signing is quick, so its first look succeeds.
    p = server.aws_run("signer", "wait", "successful-signing-job", "--job-id", job_id, timeout=120)
    assert p.returncode == 0, p.stderr
    j = server.aws("signer", "describe-signing-job", "--job-id", job_id)
    assert j["jobId"] == job_id and j["status"] == "Succeeded" and j["statusReason"] == "Signing Succeeded"
    assert j["source"] == {"s3": {"bucketName": fw["bucket"], "key": fw["key"], "version": fw["version"]}}
    assert j["signedObject"] == {"s3": {"bucketName": fw["bucket"], "key": f"signed/{job_id}"}}
    assert j["signingMaterial"] == {"certificateArn": cert_arn}
    assert j["platformId"] == "AmazonFreeRTOS-Default" and j["profileName"] == profile
    assert j["signingParameters"] == {"certname": CERTNAME}
    assert j["jobOwner"] == j["jobInvoker"] and re.fullmatch(r"\d{12}", j["jobOwner"])
    assert j["completedAt"] >= j["createdAt"]
    # 135 months of validity.
    assert 134 * 30 * 86400 < j["signatureExpiresAt"] - j["completedAt"] < 136 * 31 * 86400

    # The signed object: signer's JSON document with the payload and its signature.
    env = json.loads(get_object(server, fw["bucket"], f"signed/{job_id}", work / "signed.json"))
    assert list(env) == ["rawPayloadSize", "signature", "signatureAlgorithm", "payload"]
    assert env["rawPayloadSize"] == len(fw["data"])
    assert env["signatureAlgorithm"] == "SHA256withECDSA"
    assert base64.b64decode(env["payload"]) == fw["data"]
    assert_verifies(ident.cert_pem, fw["data"], env["signature"])
    ident.verify(fw["data"], base64.b64decode(env["signature"]))

    listed = server.aws("signer", "list-signing-jobs")["jobs"]
    mine = [x for x in listed if x["jobId"] == job_id]
    assert len(mine) == 1 and mine[0]["status"] == "Succeeded" and mine[0]["isRevoked"] is False
    assert mine[0]["signedObject"] == j["signedObject"]
    assert job_id in [x["jobId"] for x in server.aws("signer", "list-signing-jobs", "--status", "Succeeded")["jobs"]]
    assert job_id not in [x["jobId"] for x in server.aws("signer", "list-signing-jobs", "--status", "Failed")["jobs"]]
    assert job_id in [x["jobId"] for x in server.aws(
        "signer", "list-signing-jobs", "--platform-id", "AmazonFreeRTOS-Default")["jobs"]]
    assert server.aws("signer", "list-signing-jobs", "--is-revoked")["jobs"] == []
    future = "2099-01-01T00:00:00Z"
    assert job_id in [x["jobId"] for x in server.aws(
        "signer", "list-signing-jobs", "--signature-expires-before", future)["jobs"]]
    assert job_id not in [x["jobId"] for x in server.aws(
        "signer", "list-signing-jobs", "--signature-expires-after", future)["jobs"]]


def test_start_signing_job_is_idempotent(server, fw, profile, signer_client):
    token = unique("token")
    first = start_job(server, fw["bucket"], fw["key"], fw["version"], profile, "idem/", "--client-request-token", token)
    again = start_job(server, fw["bucket"], fw["key"], fw["version"], profile, "idem/", "--client-request-token", token)
    assert again == first
    other = start_job(server, fw["bucket"], fw["key"], fw["version"], profile, "idem/")
    assert other != first
    wait_job(server, first)
    wait_job(server, other)
    assert sorted(keys_under(server, fw["bucket"], "idem/")) == sorted([f"idem/{first}", f"idem/{other}"])


def test_list_signing_jobs_pages(server, fw, profile, signer_client):
    ids = [start_job(server, fw["bucket"], fw["key"], fw["version"], profile, "pages/") for _ in range(3)]
    for i in ids:
        wait_job(server, i)
    seen, token = [], None
    while True:
        kw = {"maxResults": 2}
        if token:
            kw["nextToken"] = token
        page = signer_client.list_signing_jobs(**kw)
        assert len(page["jobs"]) <= 2
        seen += [j["jobId"] for j in page["jobs"]]
        token = page.get("nextToken")
        if not token:
            break
    assert set(ids) <= set(seen) and len(seen) == len(set(seen))
    # Newest first.
    assert [s for s in seen if s in ids] == list(reversed(ids))


def test_job_on_a_missing_object_fails_and_writes_nothing(server, fw, profile):
    job_id = start_job(server, fw["bucket"], fw["key"], "0" * 32, profile, "missing/")
    p = server.aws_run("signer", "wait", "successful-signing-job", "--job-id", job_id, timeout=120)
    assert p.returncode != 0 and "Failed" in (p.stderr + p.stdout), p.stderr
    j = wait_job(server, job_id)
    assert j["status"] == "Failed"
    assert "does not exist" in j["statusReason"] and fw["key"] in j["statusReason"]
    assert "signedObject" not in j
    job_id = start_job(server, fw["bucket"], "fw/no-such-key.bin", fw["version"], profile, "missing/")
    assert "does not exist" in wait_job(server, job_id)["statusReason"]
    assert keys_under(server, fw["bucket"], "missing/") == []
    failed = server.aws("signer", "list-signing-jobs", "--status", "Failed")["jobs"]
    assert job_id in [x["jobId"] for x in failed]


def test_job_with_a_canceled_profile_fails_and_writes_nothing(server, fw, cert_arn):
    name = "cancel_" + unique("c").replace("-", "_")
    put_profile(server, name, cert_arn)
    server.aws("signer", "cancel-signing-profile", "--profile-name", name)
    job_id = start_job(server, fw["bucket"], fw["key"], fw["version"], name, "canceled/")
    j = wait_job(server, job_id)
    assert j["status"] == "Failed" and "Canceled" in j["statusReason"], j
    assert keys_under(server, fw["bucket"], "canceled/") == []


def test_job_with_a_key_that_does_not_match_fails_and_writes_nothing(server, fw, work):
    """The store is changed behind the server's back: certificate A now shows B's
    certificate while keeping A's sealed key. Signing must notice and refuse."""
    a = Identity(work / "mis-a", "updraft-mismatch-a")
    b = Identity(work / "mis-b", "updraft-mismatch-b")
    arn_a, arn_b = import_certificate(server, a), import_certificate(server, b)
    name = "mismatch_" + unique("m").replace("-", "_")
    put_profile(server, name, arn_a)
    run_sql(server, (
        "UPDATE acm_certificates SET certificate_pem = "
        f"(SELECT certificate_pem FROM acm_certificates WHERE certificate_id = '{cert_id(arn_b)}') "
        f"WHERE certificate_id = '{cert_id(arn_a)}'"
    ))
    job_id = start_job(server, fw["bucket"], fw["key"], fw["version"], name, "mismatch/")
    j = wait_job(server, job_id)
    assert j["status"] == "Failed", j
    assert "does not match" in j["statusReason"] and arn_a in j["statusReason"], j
    assert keys_under(server, fw["bucket"], "mismatch/") == []


def test_start_signing_job_validation(server, fw, profile, signer_client):
    raw = server.client("signer", parameter_validation=False)
    src = {"s3": {"bucketName": fw["bucket"], "key": fw["key"], "version": fw["version"]}}
    dst = {"s3": {"bucketName": fw["bucket"], "prefix": "val/"}}
    client_error(lambda: signer_client.start_signing_job(source=src, destination=dst, profileName="no_such_profile"),
                 "ResourceNotFoundException", 404)
    client_error(lambda: raw.start_signing_job(source=src, destination=dst, profileName="bad-name"),
                 "ValidationException", 400)
    client_error(lambda: raw.start_signing_job(source={"s3": {"bucketName": fw["bucket"], "key": fw["key"]}},
                                               destination=dst, profileName=profile), "ValidationException", 400)
    client_error(lambda: raw.start_signing_job(source={}, destination=dst, profileName=profile), "ValidationException", 400)
    client_error(lambda: raw.start_signing_job(source=src, destination={"s3": {"prefix": "x/"}}, profileName=profile),
                 "ValidationException", 400)
    client_error(lambda: raw.start_signing_job(source=src, destination=dst, profileName=profile, profileOwner="123"),
                 "ValidationException", 400)
    client_error(lambda: signer_client.describe_signing_job(jobId="00000000-0000-0000-0000-000000000000"),
                 "ResourceNotFoundException", 404)
    client_error(lambda: signer_client.list_signing_jobs(status="Done"), "ValidationException", 400)
    client_error(lambda: signer_client.list_signing_jobs(maxResults=26), "ValidationException", 400)
    assert keys_under(server, fw["bucket"], "val/") == []
    # A waiter on a job that does not exist stops at once (ResourceNotFoundException).
    p = server.aws_run("signer", "wait", "successful-signing-job", "--job-id", "no-such-job", timeout=120)
    assert p.returncode != 0


# ----------------------------------------------------------------------- OTA updates


def test_ota_with_aws_signer_job_id(server, fw, profile, ident, work, thing_arn):
    """The seed's 'create a stream with an existing code-signing job ID': no fileLocation;
    the update delivers the job's signed payload, with the job's signature."""
    job_id = start_job(server, fw["bucket"], fw["key"], fw["version"], profile, "SignedImages/")
    assert wait_job(server, job_id)["status"] == "Succeeded"
    files = [{"fileName": "/device/fw.bin", "fileType": 1, "fileVersion": "1", "codeSigning": {"awsSignerJobId": job_id}}]
    ota_id = create_ota(server, work, thing_arn, files)
    info = wait_ota(server, ota_id)
    assert info["otaUpdateFiles"][0]["codeSigning"] == {"awsSignerJobId": job_id}
    doc = job_document(server, ota_id)
    f = doc["files"][0]
    assert f["filepath"] == "/device/fw.bin" and f["filesize"] == len(fw["data"]) and f["fileType"] == 1
    assert f["certfile"] == CERTNAME
    sig = server.aws("signer", "describe-signing-job", "--job-id", job_id)
    assert "sig-sha256-ecdsa" in f, f
    assert_verifies(ident.cert_pem, fw["data"], f["sig-sha256-ecdsa"])
    # The stream serves the payload: the newest version of the signed object's key.
    stream = server.aws("iot", "describe-stream", "--stream-id", doc["streamname"])["streamInfo"]
    assert stream["files"][0]["s3Location"]["bucket"] == fw["bucket"]
    assert stream["files"][0]["s3Location"]["key"] == sig["signedObject"]["s3"]["key"]
    latest = get_object(server, fw["bucket"], f"SignedImages/{job_id}", work / "latest.bin")
    assert latest == fw["data"]
    versions = server.aws("s3api", "list-object-versions", "--bucket", fw["bucket"], "--prefix", f"SignedImages/{job_id}")
    assert len(versions["Versions"]) == 2  # signer's JSON document, then the raw payload
    older = [v for v in versions["Versions"] if not v["IsLatest"]][0]
    env = json.loads(get_object(server, fw["bucket"], f"SignedImages/{job_id}", work / "env.json", older["VersionId"]))
    assert env["signature"] == f["sig-sha256-ecdsa"] and base64.b64decode(env["payload"]) == fw["data"]
    # What a device downloads over MQTT verifies against the certificate.
    thing = thing_arn.rsplit("/", 1)[1]
    dev_file, data = device_stream_download(server, thing)
    assert data == fw["data"]
    assert_verifies(ident.cert_pem, data, dev_file["sig-sha256-ecdsa"])
    # A second update from the same job reuses the payload version.
    ota2 = create_ota(server, work, thing_arn, files)
    wait_ota(server, ota2)
    versions = server.aws("s3api", "list-object-versions", "--bucket", fw["bucket"], "--prefix", f"SignedImages/{job_id}")
    assert len(versions["Versions"]) == 2


def test_ota_with_aws_signer_job_id_and_the_seeds_stream(server, fw, profile, ident, work, thing_arn):
    """The seed's manual flow: a stream made from the signed object's GUID key, then an
    update with fileLocation.stream and awsSignerJobId."""
    job_id = start_job(server, fw["bucket"], fw["key"], fw["version"], profile, "")
    signed_key = wait_job(server, job_id)["signedObject"]["s3"]["key"]
    assert signed_key == job_id
    stream_id = unique("signed")
    server.aws("iot", "create-stream", "--stream-id", stream_id, "--role-arn", ROLE_ARN, "--files", json.dumps(
        [{"fileId": 123, "s3Location": {"bucket": fw["bucket"], "key": signed_key}}]))
    files = [{"fileName": "firmware.bin", "fileType": 1,
              "fileLocation": {"stream": {"streamId": stream_id, "fileId": 123}},
              "codeSigning": {"awsSignerJobId": job_id}}]
    ota_id = create_ota(server, work, thing_arn, files)
    wait_ota(server, ota_id)
    doc = job_document(server, ota_id)
    assert doc["streamname"] == stream_id
    f = doc["files"][0]
    assert f["fileid"] == 123 and f["filesize"] == len(fw["data"]) and f["certfile"] == CERTNAME
    assert_verifies(ident.cert_pem, fw["data"], f["sig-sha256-ecdsa"])
    # The stream now follows the payload version (it named the key without a version).
    assert server.aws("iot", "describe-stream", "--stream-id", stream_id)["streamInfo"]["streamVersion"] == 2
    thing = thing_arn.rsplit("/", 1)[1]
    dev_file, data = device_stream_download(server, thing)
    assert data == fw["data"]
    assert_verifies(ident.cert_pem, data, dev_file["sig-sha256-ecdsa"])


def test_ota_starting_a_signing_job_with_a_new_profile(server, fw, cert_arn, ident, work, thing_arn):
    """startSigningJobParameter with signingProfileParameter: Updraft creates the profile,
    signs, and streams the signed payload."""
    name = "otanew_" + unique("n").replace("-", "_")
    files = [{
        "fileName": "/device/fw.bin", "fileType": 1, "fileVersion": "1",
        "fileLocation": {"s3Location": {"bucket": fw["bucket"], "key": fw["key"], "version": fw["version"]}},
        "codeSigning": {"startSigningJobParameter": {
            "signingProfileName": name,
            "signingProfileParameter": {"certificateArn": cert_arn, "platform": "AmazonFreeRTOS-Default",
                                        "certificatePathOnDevice": "/certs/new_profile.pem"},
            "destination": {"s3Destination": {"bucket": fw["bucket"], "prefix": "ota-signed/"}},
        }},
    }]
    ota_id = create_ota(server, work, thing_arn, files, protocols=("MQTT", "HTTP"))
    info = wait_ota(server, ota_id)
    job_id = info["otaUpdateFiles"][0]["codeSigning"]["awsSignerJobId"]
    job = server.aws("signer", "describe-signing-job", "--job-id", job_id)
    assert job["status"] == "Succeeded" and job["profileName"] == name
    assert job["signedObject"]["s3"] == {"bucketName": fw["bucket"], "key": f"ota-signed/{job_id}"}
    p = server.aws("signer", "get-signing-profile", "--profile-name", name)
    assert p["signingParameters"] == {"certname": "/certs/new_profile.pem"} and p["signingMaterial"]["certificateArn"] == cert_arn
    doc = job_document(server, ota_id)
    f = doc["files"][0]
    assert f["certfile"] == "/certs/new_profile.pem" and f["filesize"] == len(fw["data"])
    assert_verifies(ident.cert_pem, fw["data"], f["sig-sha256-ecdsa"])
    assert f["update_data_url"].endswith(f"/{fw['bucket']}/ota-signed/{job_id}}}"), f["update_data_url"]
    # A device over HTTP (iot-jobs-data + pre-signed URL) gets the signed payload.
    thing = thing_arn.rsplit("/", 1)[1]
    ex = server.aws("iot-jobs-data", "describe-job-execution", "--thing-name", thing, "--job-id", f"AFR_OTA-{ota_id}")
    url = json.loads(ex["execution"]["jobDocument"])["afr_ota"]["files"][0]["update_data_url"]
    got = requests.get(url, timeout=30)
    assert got.status_code == 200 and got.content == fw["data"]
    assert_verifies(ident.cert_pem, got.content, f["sig-sha256-ecdsa"])
    # And over MQTT.
    dev_file, data = device_stream_download(server, thing)
    assert data == fw["data"]
    # A second update with the same inline profile reuses it; different settings are refused.
    ota2 = create_ota(server, work, thing_arn, files)
    wait_ota(server, ota2)
    files[0]["codeSigning"]["startSigningJobParameter"]["signingProfileParameter"]["certificatePathOnDevice"] = "/other"
    path = work / "conflict.json"
    path.write_text(json.dumps(files))
    err = cli_error(server, "InvalidRequestException", "iot", "create-ota-update", "--ota-update-id", unique("ota"),
                    "--targets", thing_arn, "--files", f"file://{path}", "--role-arn", ROLE_ARN)
    assert "other settings" in err


def test_ota_starting_a_signing_job_with_an_existing_profile(server, fw, profile, ident, work, thing_arn):
    """The seed's 'starts a code-signing job with an existing profile'."""
    files = [{
        "fileName": "your_firmware_path_on_device", "fileType": 1, "fileVersion": "1",
        "fileLocation": {"s3Location": {"bucket": fw["bucket"], "key": fw["key"], "version": fw["version"]}},
        "codeSigning": {"startSigningJobParameter": {
            "signingProfileName": profile,
            "destination": {"s3Destination": {"bucket": fw["bucket"]}},
        }},
    }]
    ota_id = create_ota(server, work, thing_arn, files)
    info = wait_ota(server, ota_id)
    job_id = info["otaUpdateFiles"][0]["codeSigning"]["awsSignerJobId"]
    f = job_document(server, ota_id)["files"][0]
    assert f["certfile"] == CERTNAME
    assert_verifies(ident.cert_pem, fw["data"], f["sig-sha256-ecdsa"])
    stream = server.aws("iot", "describe-stream", "--stream-id", job_document(server, ota_id)["streamname"])
    assert stream["streamInfo"]["files"][0]["s3Location"]["key"] == job_id  # no prefix given
    # Without a destination the signed object goes next to the source under SignedImages/.
    del files[0]["codeSigning"]["startSigningJobParameter"]["destination"]
    ota2 = create_ota(server, work, thing_arn, files)
    job2 = wait_ota(server, ota2)["otaUpdateFiles"][0]["codeSigning"]["awsSignerJobId"]
    assert server.aws("signer", "describe-signing-job", "--job-id", job2)["signedObject"]["s3"]["key"] == f"SignedImages/{job2}"


def test_ota_custom_code_signing_with_updraft_sign(server, fw, ident, work, thing_arn):
    """Manual signing: `updraft sign` prints what customCodeSigning takes."""
    p = subprocess.run([server.binary, "sign", "--key", str(ident.key_path), "--certificate", str(ident.cert_path),
                        str(fw["path"])], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    sig = p.stdout.strip()
    assert_verifies(ident.cert_pem, fw["data"], sig)
    files = [{
        "fileName": "fw.bin", "fileLocation": {"s3Location": {"bucket": fw["bucket"], "key": fw["key"]}},
        "codeSigning": {"customCodeSigning": {
            "signature": {"inlineDocument": sig},
            "certificateChain": {"certificateName": "/certs/manual.pem"},
            "hashAlgorithm": "SHA256", "signatureAlgorithm": "ECDSA",
        }},
    }]
    ota_id = create_ota(server, work, thing_arn, files)
    wait_ota(server, ota_id)
    f = job_document(server, ota_id)["files"][0]
    assert f["certfile"] == "/certs/manual.pem" and f["sig-sha256-ecdsa"] == sig
    assert_verifies(ident.cert_pem, fw["data"], f["sig-sha256-ecdsa"])
    # A key that is not the certificate's is caught before anything is printed.
    other = Identity(work / "sign-other", "updraft-sign-other")
    p = subprocess.run([server.binary, "sign", "--key", str(other.key_path), "--certificate", str(ident.cert_path),
                        str(fw["path"])], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and p.stdout == "" and "does not belong" in p.stderr


def test_ota_signing_refusals(server, fw, profile, cert_arn, work, thing_arn):
    iot = server.client("iot")

    def create(code_signing, location=True):
        f = {"fileName": "fw.bin", "codeSigning": code_signing}
        if location:
            f["fileLocation"] = {"s3Location": {"bucket": fw["bucket"], "key": fw["key"]}}
        return iot.create_ota_update(otaUpdateId=unique("ota"), targets=[thing_arn], files=[f], roleArn=ROLE_ARN)

    before = {o["otaUpdateId"] for o in iot.list_ota_updates()["otaUpdates"]}
    client_error(lambda: create({"awsSignerJobId": "00000000-0000-0000-0000-000000000000"}, False),
                 "ResourceNotFoundException", 404)
    failed = start_job(server, fw["bucket"], fw["key"], "f" * 32, profile, "refused/")
    assert wait_job(server, failed)["status"] == "Failed"
    e = client_error(lambda: create({"awsSignerJobId": failed}, False), "InvalidRequestException", 400)
    assert "did not succeed" in str(e)
    client_error(lambda: create({"startSigningJobParameter": {"signingProfileName": "no_such_profile"}}),
                 "ResourceNotFoundException", 404)
    canceled = "otacancel_" + unique("c").replace("-", "_")
    put_profile(server, canceled, cert_arn)
    server.aws("signer", "cancel-signing-profile", "--profile-name", canceled)
    e = client_error(lambda: create({"startSigningJobParameter": {"signingProfileName": canceled}}),
                     "InvalidRequestException", 400)
    assert "Canceled" in str(e)
    client_error(lambda: create({"startSigningJobParameter": {}}), "InvalidRequestException", 400)
    client_error(lambda: create({"startSigningJobParameter": {"signingProfileName": profile}}, False),
                 "InvalidRequestException", 400)
    client_error(lambda: create({"startSigningJobParameter": {
        "signingProfileName": profile, "destination": {"s3Destination": {"bucket": "no-such-bucket-here"}}}}),
        "ResourceNotFoundException", 404)
    client_error(lambda: create({"awsSignerJobId": failed, "startSigningJobParameter": {"signingProfileName": profile}}),
                 "InvalidRequestException", 400)
    e = client_error(lambda: create({"startSigningJobParameter": {
        "signingProfileName": "otaval_" + unique("v").replace("-", "_"),
        "signingProfileParameter": {"certificateArn": cert_arn, "platform": "AmazonFreeRTOS-TI-CC3220SF",
                                    "certificatePathOnDevice": "/c"}}}),
        "InvalidRequestException", 400)
    assert "SHA-1" in str(e)
    after = {o["otaUpdateId"] for o in iot.list_ota_updates()["otaUpdates"]}
    assert after == before, "refused requests created OTA updates"


def test_ota_whose_signing_fails_is_create_failed(server, fw, work, thing_arn):
    """Signing happens while the update is built: a job that fails there (here: the key
    no longer matches the certificate) makes the update CREATE_FAILED with errorInfo."""
    a = Identity(work / "of-a", "updraft-otafail-a")
    b = Identity(work / "of-b", "updraft-otafail-b")
    arn_a, arn_b = import_certificate(server, a), import_certificate(server, b)
    name = "otafail_" + unique("f").replace("-", "_")
    put_profile(server, name, arn_a)
    run_sql(server, (
        "UPDATE acm_certificates SET certificate_pem = "
        f"(SELECT certificate_pem FROM acm_certificates WHERE certificate_id = '{cert_id(arn_b)}') "
        f"WHERE certificate_id = '{cert_id(arn_a)}'"
    ))
    files = [{
        "fileName": "fw.bin",
        "fileLocation": {"s3Location": {"bucket": fw["bucket"], "key": fw["key"], "version": fw["version"]}},
        "codeSigning": {"startSigningJobParameter": {
            "signingProfileName": name, "destination": {"s3Destination": {"bucket": fw["bucket"], "prefix": "otafail/"}}}},
    }]
    ota_id = create_ota(server, work, thing_arn, files)
    info = wait_ota(server, ota_id, want="CREATE_FAILED")
    assert "does not match" in info["errorInfo"]["message"], info
    assert info["errorInfo"]["code"]
    assert keys_under(server, fw["bucket"], "otafail/") == []
    cli_error(server, "ResourceNotFoundException", "iot", "describe-job", "--job-id", f"AFR_OTA-{ota_id}")


# ----------------------------------------------------------------------- private keys


def test_no_api_returns_a_private_key(server, ident, cert_arn, profile, fw):
    job_id = start_job(server, fw["bucket"], fw["key"], fw["version"], profile, "leak/")
    wait_job(server, job_id)
    outputs = [
        server.aws_run("acm", "describe-certificate", "--certificate-arn", cert_arn).stdout,
        server.aws_run("acm", "list-certificates", "--includes", "keyTypes=EC_prime256v1").stdout,
        server.aws_run("signer", "get-signing-profile", "--profile-name", profile).stdout,
        server.aws_run("signer", "list-signing-profiles").stdout,
        server.aws_run("signer", "describe-signing-job", "--job-id", job_id).stdout,
        server.aws_run("signer", "list-signing-jobs").stdout,
    ]
    for text in outputs:
        assert text.strip(), "no output"
        assert "PRIVATE KEY" not in text
        for secret in ident.key_secrets():
            assert secret not in text
    # At rest: sealed ciphertext only, under a key in the data directory (mode 0600).
    rows = query_sql(server, f"SELECT private_key FROM acm_certificates WHERE certificate_id = '{cert_id(cert_arn)}'")
    assert len(rows) == 1
    sealed = rows[0][0]
    assert sealed.startswith("v1:") and "PRIVATE" not in sealed
    for secret in ident.key_secrets():
        assert secret not in sealed
    kek = server.data_dir / "signing.key"
    assert kek.exists() and stat.S_IMODE(os.stat(kek).st_mode) == 0o600


def test_operator_signing_key_file(tmp_path_factory, work):
    """--signing-key-file: the operator's key seals the keys; another key is refused at start."""
    root = tmp_path_factory.mktemp("kek")
    pg = None
    database = None
    if os.environ.get("UPDRAFT_TEST_DATABASE"):
        pg = PgDatabase(os.environ["UPDRAFT_TEST_DATABASE"])
        database = pg.create()
    key_file = root / "operator.key"
    key_file.write_text(os.urandom(32).hex() + "\n")
    os.chmod(key_file, 0o600)
    srv = Server(root / "data", database=database, extra_args=["--signing-key-file", str(key_file)])
    try:
        srv.start()
        assert not (srv.data_dir / "signing.key").exists()
        ident = Identity(root / "id", "updraft-operator-kek")
        arn = import_certificate(srv, ident)
        bucket = unique("kek")
        srv.aws("s3", "mb", f"s3://{bucket}")
        srv.aws("s3api", "put-bucket-versioning", "--bucket", bucket, "--versioning-configuration", "Status=Enabled")
        data = firmware_bytes(5000)
        path = root / "fw.bin"
        path.write_bytes(data)
        version = srv.aws("s3api", "put-object", "--bucket", bucket, "--key", "fw.bin", "--body", str(path))["VersionId"]
        put_profile(srv, "kek_profile", arn)
        job = start_job(srv, bucket, "fw.bin", version, "kek_profile", "s/")
        j = wait_job(srv, job)
        assert j["status"] == "Succeeded", j
        env = json.loads(get_object(srv, bucket, f"s/{job}", root / "env.json"))
        assert_verifies(ident.cert_pem, data, env["signature"])
        # The same installation with another key: refused, naming the problem.
        srv.stop()
        other = root / "other.key"
        other.write_text(os.urandom(32).hex())
        os.chmod(other, 0o600)
        srv.extra_args = ["--signing-key-file", str(other)]
        with pytest.raises(RuntimeError) as ei:
            srv.start(timeout=30)
        assert "exited" in str(ei.value)
        log = srv.log_path.read_text(errors="replace")
        assert "is not the one this installation's private keys are sealed under" in log
        srv.kill()
        # The right key again: jobs still sign.
        srv.extra_args = ["--signing-key-file", str(key_file)]
        srv.start()
        job = start_job(srv, bucket, "fw.bin", version, "kek_profile", "s/")
        assert wait_job(srv, job)["status"] == "Succeeded"
    finally:
        srv.kill()
        if pg:
            pg.drop()
