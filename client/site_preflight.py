"""A site's preflight before any run (``ichfed site preflight``): the SuperLink is reachable over
TLS, this site's SuperNode key is registered there, and the site's data passes ``site check``.

The connection check is what ``flower-supernode`` does when it starts, stopped right after: a TCP
connection, a TLS handshake verified against the CA certificate and the host name, then Flower's
``ActivateNode`` call signed with the site's key (the SuperLink answers with the node ID only for
a registered key) and ``DeactivateNode`` at once. Nothing else is sent; no run is joined.
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path
from typing import Any

from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)


def connection_settings(config_path: Path, superlink: str | None, root_certificates: Path | None,
                        node_key: Path | None) -> dict[str, Any]:
    """The SuperLink address, CA certificate and node key: from the options, else from the kit's
    ``supernode.env`` beside the config (relative paths there are relative to the kit)."""
    from .site_kit import ENV_NAME, check_superlink, read_env

    kit = Path(config_path).resolve().parent
    env = read_env(kit / ENV_NAME) if (kit / ENV_NAME).is_file() else {}

    def path(value: Path | None, key: str, flag: str) -> Path:
        if value is not None:
            return Path(value)
        if key not in env:
            raise IchfedError(f"{flag}: not given and no {key} in {kit / ENV_NAME}")
        p = Path(env[key])
        return p if p.is_absolute() else kit / p

    address = superlink or env.get("SUPERLINK")
    if not address:
        raise IchfedError(f"--superlink: not given and no SUPERLINK in {kit / ENV_NAME}")
    return {"superlink": check_superlink(address),
            "root_certificates": path(root_certificates, "ROOT_CERTIFICATES", "--root-certificates"),
            "node_key": path(node_key, "NODE_KEY", "--auth-supernode-private-key")}


def check_connection(superlink: str, root_certificates: Path, node_key: Path, timeout: float = 20.0) -> dict[str, Any]:
    """TCP, TLS and node registration against the SuperLink; each step's ``ok`` and ``detail``."""
    from shared.security.pki import load_certificate

    load_certificate(root_certificates)  # a wrong file is a one-line error, not a TLS failure
    private = _load_node_key(node_key)
    host, port = superlink.rsplit(":", 1)
    host = host.strip("[]")
    out: dict[str, Any] = {"superlink": superlink, "tls": {"ok": False}, "registered": {"ok": False}}
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as raw:
            ctx = ssl.create_default_context(cafile=str(root_certificates))
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                out["tls"] = {"ok": True, "detail": f"{tls.version()}, certificate verified for {host} "
                                                    f"against {root_certificates}"}
    except ssl.SSLCertVerificationError as e:
        out["tls"] = {"ok": False, "detail": f"TLS handshake failed: certificate verify failed: {e.verify_message} "
                      f"(is the SuperLink's certificate made for {host}, by the CA of {root_certificates}?)"}
        return out
    except ssl.SSLError as e:
        out["tls"] = {"ok": False, "detail": f"TLS handshake failed: {e}"}
        return out
    except OSError as e:
        out["tls"] = {"ok": False, "detail": f"cannot reach {superlink}: {e.strerror or e}"}
        return out
    out["registered"] = _activate(superlink, root_certificates, private, timeout)
    return out


def _load_node_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    p = Path(path)
    if not p.is_file():
        raise IchfedError(f"{p}: SuperNode private key not found")
    try:
        key = load_ssh_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise IchfedError(f"{p}: not an unencrypted OpenSSH private key ({str(e).splitlines()[0]})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IchfedError(f"{p}: a SuperNode key is EC (P-384), this one is not")
    return key


def _activate(superlink: str, root_certificates: Path, private, timeout: float) -> dict[str, Any]:
    """Flower's ``ActivateNode`` with the site's key, then ``DeactivateNode``: is the key registered?"""
    import httpx
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL
    from flwr.proto.fleet_pb2 import ActivateNodeRequest, DeactivateNodeRequest
    from flwr.supercore.error import FlowerError
    from flwr.supercore.interceptors.http.runtime_version import (
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                    NodeAuthHttpInterceptor(private, private.public_key())]
    try:
        with FleetHttpClient.from_server_address(superlink, False, str(root_certificates), interceptors) as client:
            reply = client.ActivateNode(ActivateNodeRequest(public_key=public_key_to_bytes(private.public_key()),
                                                            heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL))
            try:
                client.DeactivateNode(DeactivateNodeRequest(node_id=reply.node_id))
            except (httpx.HTTPError, RuntimeError) as e:  # the SuperLink marks it offline after the heartbeat anyway
                log.info("preflight: deactivating node %s: %s", reply.node_id, e)
            return {"ok": True, "node_id": int(reply.node_id),
                    "detail": f"key registered: the SuperLink knows this site as node {reply.node_id}"}
    except httpx.HTTPStatusError as e:
        err = FlowerError.from_json(e.response.text)
        text = f"{err.message} {err.public_details or ''}" if err else e.response.text[:300]
        return {"ok": False, "detail": _why_refused(text, e.response.status_code)}
    except httpx.HTTPError as e:
        return {"ok": False, "detail": f"the SuperLink did not answer the Fleet API: {e}"}


def _why_refused(text: str, status: int) -> str:
    # Flower sends only the public message: "not registered" and "online already" read the same.
    if "Failed to activate SuperNode" in text:
        return ("the SuperLink refused this site's key: it is not registered (send the key's .pub to the "
                "coordinator, who runs `flwr supernode register <file>.pub <connection>`), or a SuperNode "
                "with this key is online already (preflight is for before the SuperNode starts)")
    return f"refused by the SuperLink (HTTP {status}): {' '.join(text.split())[:300]}"


def preflight(config_path: Path, superlink: str | None = None, root_certificates: Path | None = None,
              node_key: Path | None = None, open_images: bool = True,
              cross_fit_folds: int | None = None) -> dict[str, Any]:
    """``site check`` plus the connection check; ``ready`` only when both pass."""
    from shared.security.fingerprint import fingerprint_file

    from .site_check import check_site

    report = check_site(config_path, open_images=open_images, cross_fit_folds=cross_fit_folds)
    settings = connection_settings(config_path, superlink, root_certificates, node_key)
    conn = check_connection(**settings)
    conn["ca_fingerprint"] = fingerprint_file(settings["root_certificates"]).fingerprint
    if report.get("public_key") and Path(report["public_key"]).is_file():
        conn["public_key_fingerprint"] = fingerprint_file(report["public_key"]).fingerprint
    problems = [f"{step}: {conn[step]['detail']}" for step in ("tls", "registered")
                if not conn[step]["ok"] and conn[step].get("detail")]
    report["connection"] = conn
    report["not_ready"] = problems + report["not_ready"]
    report["ready"] = not report["not_ready"]
    return report
