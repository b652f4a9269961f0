"""The internal CA, SPIFFE identities and mutual TLS (RFC 5280, X509-SVID, RFC 8705).

Import from the modules: :mod:`aegis.pki.ca` (root and intermediates), :mod:`aegis.pki.service`
(issuance, revocation), :mod:`aegis.pki.spiffe`, :mod:`aegis.pki.peer` (peer validation),
:mod:`aegis.pki.tls` and :mod:`aegis.pki.listener` (mTLS), :mod:`aegis.pki.middleware` (transport
identity for ASGI apps, trusted proxies), :mod:`aegis.pki.binding` (RFC 8705 client
authentication and certificate-bound tokens), :mod:`aegis.pki.renewal` (certificate manager).
The package face re-exports nothing so that the OAuth layer can import :mod:`aegis.pki.binding`
without pulling in the CA.
"""

__all__: list[str] = []
