"""HTTP face of the internal CA: enrolment (RFC 2986 CSR in, RFC 5280 certificate out), trust
bundle and CRL (RFC 5280 §5), as plain Starlette routes under ``/pki/v1``.

* ``POST /pki/v1/sign`` — form-encoded ``csr`` (PEM) plus either client credentials (as at the
  token endpoint) or ``bootstrap_token``; optional ``lifetime`` (seconds, capped). JSON answer.
* ``GET /pki/v1/bundle`` — the trust bundle, PEM (root, then every trusted intermediate).
* ``GET /pki/v1/crl`` — the issuing intermediate's CRL, DER; ``/pki/v1/crl.pem`` every trusted
  intermediate's CRL as PEM, for nginx ``ssl_crl``.

A refused request is counted by its stable code and writes nothing; bodies never echo the CSR,
the token or a secret.
"""

from __future__ import annotations

import logging
from typing import Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from aegis.errors import AegisError
from aegis.oauth.endpoints import read_form
from aegis.pki.service import PkiService
from aegis.telemetry.logging import log_event
from aegis.telemetry.metrics import count_rejection

__all__ = ["PEM_CHAIN", "PkiEndpoints"]

PEM_CHAIN: Final = "application/pem-certificate-chain"
_NO_STORE: Final = {"Cache-Control": "no-store"}


class PkiEndpoints:
    def __init__(self, service: PkiService, *, max_body_bytes: int) -> None:
        self._service = service
        self._max = max_body_bytes

    def routes(self) -> list[Route]:
        return [
            Route("/pki/v1/sign", self.sign, methods=["POST"]),
            Route("/pki/v1/bundle", self.bundle, methods=["GET"]),
            Route("/pki/v1/crl", self.crl, methods=["GET"]),
            Route("/pki/v1/crl.pem", self.crl_pem, methods=["GET"]),
        ]

    def _error(self, exc: AegisError, request: Request) -> JSONResponse:
        count_rejection("pki_sign", exc.code)
        source = request.client.host if request.client else "unknown"
        log_event(
            "pki.sign_rejected",
            level=logging.WARNING,
            code=exc.code,
            reason=exc.message,
            source=source,
        )
        spec = exc.spec
        message = "internal error" if exc.code == "server_error" else exc.message
        headers = dict(_NO_STORE)
        if spec.status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="aegis", charset="UTF-8"'
        if "retry_after" in exc.details:  # credentials_settling: the wait, as the token endpoint
            headers["Retry-After"] = str(exc.details["retry_after"])
        body = {"error": spec.oauth_error, "code": exc.code, "error_description": message}
        return JSONResponse(body, status_code=spec.status, headers=headers)

    async def sign(self, request: Request) -> Response:
        try:
            form, resources = await read_form(request, self._max)
            if resources:
                raise AegisError(
                    "resource is not a parameter of this endpoint", code="invalid_request"
                )
            source = request.client.host if request.client else "unknown"
            issued = await self._service.sign(form, request.headers.get("authorization"), source)
        except AegisError as exc:
            return self._error(exc, request)
        log_event(
            "pki.certificate_issued",
            agent=issued.record.agent_id,
            serial=issued.record.serial,
            spiffe_id=issued.record.spiffe_id,
            not_after=issued.record.not_after,
        )
        return JSONResponse(issued.to_json(), status_code=201, headers=_NO_STORE)

    async def bundle(self, request: Request) -> Response:
        # Short max-age: during a rotation the new intermediate must reach verifiers quickly.
        return Response(
            self._service.bundle_pem(),
            media_type=PEM_CHAIN,
            headers={"Cache-Control": "max-age=60"},
        )

    async def crl(self, request: Request) -> Response:
        try:
            body = self._service.crl_der()
        except AegisError as exc:
            return self._error(exc, request)
        return Response(
            body, media_type="application/pkix-crl", headers={"Cache-Control": "max-age=10"}
        )

    async def crl_pem(self, request: Request) -> Response:
        try:
            body = self._service.crl_pem()
        except AegisError as exc:
            return self._error(exc, request)
        return Response(
            body, media_type="application/x-pem-file", headers={"Cache-Control": "max-age=10"}
        )
