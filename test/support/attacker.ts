/**
 * An attacker process for the resource-bound e2e test (test/e2e/attack.test.ts):
 *
 *   node --import tsx test/support/attacker.ts KIND URL AGENT
 *
 * KIND is one of the §4 attacks, each from many loopback source addresses
 * (127.0.x.y) so per-source limits alone cannot stop it:
 *   preauth-big   150 connections, each holding an unfinished 8 MiB message
 *   preauth-many  1000 idle connections: half upgrade and never say Hello, half never finish
 *                 their HTTP request (a refused or cut one retries after a second)
 *   wrong-proof   16 loops of Hello + a wrong AuthProof, as fast as answered
 *   big-frames    8 loops of complete 8 MiB frames before Hello
 * Every worker reconnects (after a short pause) when the appliance cuts it.
 * Prints {"ready":true} once every worker got in at least once (or was
 * refused: a refusal is the bound working), then runs until SIGTERM, when it
 * prints its counters as one JSON line and exits.
 */
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import { clientFrame, clientFrameHeader, isRefusal, rawWebSocket, writeAll, wrongProofAttempt, type RawWs } from './attack-clients.js';

type Kind = 'preauth-big' | 'preauth-many' | 'wrong-proof' | 'big-frames';

const stats = { connected: 0, refused: 0, cut: 0, errors: 0, attempts: 0 };
let stopping = false;
const sockets = new Set<RawWs>();
const pause = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function connect(url: string, from: string): Promise<RawWs | null> {
  try {
    const ws = await rawWebSocket(url, from);
    stats.connected++;
    sockets.add(ws);
    void ws.closed.then(() => {
      sockets.delete(ws);
      if (!stopping) stats.cut++;
    });
    return ws;
  } catch (e) {
    if (isRefusal(e)) stats.refused++;
    else stats.errors++;
    return null;
  }
}

/** Runs `once` in a loop until stopped; `ready` after its first turn. */
async function worker(once: () => Promise<void>, ready: () => void, gapMs: number): Promise<void> {
  let first = true;
  while (!stopping) {
    try {
      await once();
    } catch {
      stats.errors++;
    }
    if (first) ready();
    first = false;
    await pause(gapMs);
  }
}

const payload = randomBytes(1 << 20);

function attack(kind: Kind, url: string, agent: string): { workers: number; run: (i: number, ready: () => void) => Promise<void> } {
  switch (kind) {
    case 'preauth-big':
      return {
        workers: 150,
        run: (i, ready) => worker(async () => {
          const ws = await connect(url, `127.0.1.${1 + (i % 10)}`);
          if (!ws) return;
          // Declare 8 MiB, then send it 1 MiB at a time and never finish (7 MiB at most).
          await writeAll(ws.socket, clientFrameHeader(8 << 20));
          for (let n = 0; n < 7 && !ws.socket.destroyed; n++) await writeAll(ws.socket, payload);
          ready();
          await ws.closed;
        }, ready, 100),
      };
    case 'preauth-many':
      return {
        workers: 1000,
        run: (i, ready) => worker(async () => {
          const from = `127.0.2.${1 + (i % 100)}`;
          if (i % 2 === 0) {
            // Half of them upgrade and never say Hello.
            const ws = await connect(url, from);
            ready();
            if (ws) await ws.closed;
            return;
          }
          // The other half never finish their HTTP request (slowloris).
          const u = new URL(url);
          const socket = net.connect({ host: u.hostname, port: Number(u.port), localAddress: from });
          socket.on('error', () => undefined);
          socket.once('connect', () => {
            stats.connected++;
            socket.write(`GET ${u.pathname} HTTP/1.1\r\nHost: ${u.host}\r\n`);
          });
          const s0 = { socket, received: [], closed: new Promise<void>((r) => socket.once('close', () => r())) };
          sockets.add(s0);
          ready();
          await s0.closed;
          sockets.delete(s0);
          if (!stopping) stats.cut++;
        }, ready, 1000),
      };
    case 'wrong-proof':
      return {
        workers: 16,
        run: (i, ready) => worker(async () => {
          stats.attempts++;
          const r = await wrongProofAttempt(url, agent, `127.0.3.${1 + i}`);
          if (r === 'refused') stats.refused++;
          else stats.cut++;
        }, ready, 20),
      };
    case 'big-frames':
      return {
        workers: 8,
        run: (i, ready) => worker(async () => {
          const ws = await connect(url, `127.0.4.${1 + i}`);
          if (!ws) return;
          stats.attempts++;
          await writeAll(ws.socket, clientFrame(Buffer.alloc(8 << 20, 0x41)));
          await ws.closed;
        }, ready, 20),
      };
  }
}

async function main(): Promise<void> {
  const [kind, url, agent = 'db1'] = process.argv.slice(2) as [Kind, string, string?];
  const a = attack(kind, url, agent);
  if (!a) throw new Error(`unknown attack ${kind}`);
  let pending = a.workers;
  const readyOne = () => {
    if (--pending === 0) process.stdout.write(JSON.stringify({ ready: true, ...stats }) + '\n');
  };
  process.once('SIGTERM', () => {
    stopping = true;
    for (const ws of sockets) ws.socket.destroy();
    process.stdout.write(JSON.stringify({ done: true, ...stats }) + '\n', () => process.exit(0));
  });
  const runs = [];
  for (let i = 0; i < a.workers; i++) {
    let called = false;
    runs.push(a.run(i, () => {
      if (!called) {
        called = true;
        readyOne();
      }
    }));
  }
  await Promise.all(runs);
}

main().catch((e) => {
  process.stderr.write(`attacker: ${String(e)}\n`);
  process.exit(1);
});
