"""The floor for ingest: an aiomqtt subscriber that only counts heartbeats.

python -m bench._bare_subscriber PORT CA CERT KEY   -> prints "ready", then {"received": N}
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys

import aiomqtt


async def main(port: int, ca: str, cert: str, key: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    async with aiomqtt.Client(
        "127.0.0.1",
        port,
        tls_context=ctx,
        identifier="bare-sub",
        protocol=aiomqtt.ProtocolVersion.V5,
        max_queued_incoming_messages=0,
    ) as client:
        await client.subscribe("tillsyn/v1/dev/+/hb", qos=1)
        print("ready", flush=True)
        received = 0
        stream = client.messages.__aiter__()
        while True:
            try:
                # Done when the stream has been idle for 3 s after the first message.
                await asyncio.wait_for(stream.__anext__(), 3 if received else 300)
            except TimeoutError:
                break
            received += 1
        print(json.dumps({"received": received}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), *sys.argv[2:5]))
