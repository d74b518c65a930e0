"""A bare aiohttp HTTPS handler that answers every GET with a fixed JSON body: the ceiling the
status GET is compared with on the same machine.

    python -m bench.bare PORT CERT KEY
"""

from __future__ import annotations

import ssl
import sys

from aiohttp import web

BODY = (
    b'{"status":"IN_PROGRESS","resultUrl":"/text-to-image/0123456789abcdef0123456789abcdef",'
    b'"progress":{"currentImageIndex":1,"currentImageProgress":0.5,"totalImages":1},'
    b'"imageUrls":[]}'
)


async def handler(_request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


def main(argv: list[str]) -> None:
    port, cert, key = argv
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    web.run_app(
        app, host="127.0.0.1", port=int(port), ssl_context=context, access_log=None, print=None
    )


if __name__ == "__main__":
    main(sys.argv[1:])
