import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { pino } from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { BlocksnapError, isBlocksnapError } from '../../proto/errors.js';
import { ControlAnswerError, ControlSocketServer, controlRequest, socketAnswers, type ControlRoutes } from '../../proto/shared/control-socket.js';

const log = pino({ level: 'silent' });

describe('control socket: one server helper and one client for both daemons', () => {
  let dir: string;
  let sock: string;
  let server: ControlSocketServer | undefined;
  beforeEach(async () => {
    dir = await mkdtemp(path.join(tmpdir(), 'bs-ctl-'));
    sock = path.join(dir, 'x.sock');
  });
  afterEach(async () => {
    await server?.close();
    server = undefined;
    await rm(dir, { recursive: true, force: true });
  });

  const routes: ControlRoutes = {
    'GET /v1/status': () => ({ up: true }),
    'POST /v1/echo': ({ body }) => body,
    'POST /v1/busy': () => {
      throw new BlocksnapError('E_BUSY', 'volume held by job j1');
    },
    'POST /v1/stream': async ({ body, events }) => {
      const write = events();
      for (let i = 1; i <= Number(body.n); i++) write({ event: 'progress', chunksDone: i, chunksTotal: Number(body.n) });
      if (body.fail) throw new BlocksnapError('E_STORE_IO', 'disk gone');
      return { ok: true };
    },
  };

  it('answers JSON and NDJSON; the socket is 0600', async () => {
    server = await ControlSocketServer.listen(sock, routes, log);
    expect((await stat(sock)).mode & 0o777).toBe(0o600);
    expect(await controlRequest(sock, 'GET', '/v1/status')).toEqual({ up: true });
    expect(await controlRequest(sock, 'POST', '/v1/echo', { a: 1 })).toEqual({ a: 1 });
    const seen: unknown[] = [];
    const r = await controlRequest(sock, 'POST', '/v1/stream', { n: 3 }, { onEvent: (e) => seen.push(e) });
    expect(r).toEqual({ event: 'result', ok: true });
    expect(seen).toHaveLength(3);
  });

  it('errors come back with the daemon’s code, before and during a stream; unknown routes and big bodies too', async () => {
    server = await ControlSocketServer.listen(sock, routes, log);
    const codeOf = (p: Promise<unknown>) => p.then(() => 'ok', (e) => (e instanceof ControlAnswerError ? e.code : `other ${String(e)}`));
    expect(await codeOf(controlRequest(sock, 'POST', '/v1/busy', {}))).toBe('E_BUSY');
    expect(await codeOf(controlRequest(sock, 'POST', '/v1/stream', { n: 2, fail: true }))).toBe('E_STORE_IO');
    expect(await codeOf(controlRequest(sock, 'GET', '/v1/nope'))).toBe('E_NOT_FOUND');
    expect(await codeOf(controlRequest(sock, 'POST', '/v1/echo', { pad: 'x'.repeat(70 * 1024) }))).toBe('E_USAGE');
  });

  it('the client going away aborts the handler’s signal', async () => {
    let entered!: () => void;
    const inHandler = new Promise<void>((r) => (entered = r));
    let aborted!: () => void;
    const gone = new Promise<void>((r) => (aborted = r));
    server = await ControlSocketServer.listen(sock, {
      'POST /v1/wait': ({ signal }) => new Promise((_, reject) => {
        signal.addEventListener('abort', () => {
          aborted();
          reject(signal.reason);
        });
        entered();
      }),
    }, log);
    const { request } = await import('node:http');
    const req = request({ socketPath: sock, path: '/v1/wait', method: 'POST' });
    req.on('error', () => undefined);
    req.end('{}');
    await inHandler;
    req.destroy();
    await gone;
  });

  it('nobody listening: notRunning’s error, else E_DISCONNECTED; a stale socket file does not answer', async () => {
    expect(await socketAnswers(sock)).toBe(false);
    const e1 = await controlRequest(sock, 'GET', '/v1/status').catch((e) => e);
    expect(isBlocksnapError(e1, 'E_DISCONNECTED')).toBe(true);
    const e2 = await controlRequest(sock, 'GET', '/v1/status', undefined, { notRunning: () => new BlocksnapError('E_NOT_FOUND', 'no daemon') }).catch((e) => e);
    expect(isBlocksnapError(e2, 'E_NOT_FOUND')).toBe(true);
    server = await ControlSocketServer.listen(sock, routes, log);
    expect(await socketAnswers(sock)).toBe(true);
  });
});
