#!/usr/bin/env python3
"""Holds N client connections to HOST:PORT for bench/connections.sh, one step per stdin line:

  open     open N connections (each sends nothing yet)
  request  send one keep-alive `GET /data` on each open connection and read its answer
  close    close them all

After each step it prints one line, `ok <step> <seconds>` or `error <step> <why>`, and flushes.
"""
import asyncio
import sys
import time

REQUEST = b"GET /data HTTP/1.1\r\nHost: bench\r\n\r\n"


async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    status = head.split(b" ", 2)[1]
    if status != b"200":
        raise RuntimeError("status " + status.decode())


async def main(n, host, port):
    conns = []
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        step = line.strip()
        if not step:
            return
        started = time.monotonic()
        try:
            if step == "open":
                for i in range(0, n, 500):
                    batch = [asyncio.open_connection(host, port) for _ in range(min(500, n - i))]
                    conns.extend(await asyncio.gather(*batch))
            elif step == "request":
                async def one(conn):
                    reader, writer = conn
                    writer.write(REQUEST)
                    await writer.drain()
                    await read_response(reader)
                for i in range(0, len(conns), 500):
                    await asyncio.gather(*(one(c) for c in conns[i:i + 500]))
            elif step == "close":
                for _, writer in conns:
                    writer.close()
                for _, writer in conns:
                    try:
                        await writer.wait_closed()
                    except OSError:
                        pass
                conns = []
            else:
                raise RuntimeError("unknown step")
            print(f"ok {step} {time.monotonic() - started:.1f}", flush=True)
        except Exception as e:  # reported to the driver, which stops the run
            print(f"error {step} {e!r}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
